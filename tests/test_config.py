"""The run configuration (dist_xqa/config.py) and the start-up refusal of a bad one.

Spec: a bad configuration (unknown key, a language with no data, a teacher list naming a
missing branch, mismatched tokenizer settings, a DeepSpeed config that does not parse) is
refused at start-up, before any rank trains, with a message that names the key or file.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dist_xqa import train
from dist_xqa.config import (
    DEFAULT_CONFIG, REPO_ROOT, ConfigError, RunConfig, load_config, validate,
)
from dist_xqa.distributed import load_ds_config

SHIPPED_CONFIGS = sorted((REPO_ROOT / "configs").glob("*.yaml"))
SHIPPED_DS_CONFIGS = sorted((REPO_ROOT / "ds_configs").glob("*.json"))


def refused(overrides: list[str], path: str | Path | None = None) -> str:
    """The ConfigError message for loading `path` with `overrides` (fails if accepted)."""
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


def folder_overrides(path: Path) -> list[str]:
    """The squad configs leave every folder to the command line, as their comments say."""
    data = yaml.safe_load(path.read_text())["data"]
    if data["source"] != "squad":
        return []
    overrides = ["data.train.folder=/data/train"]
    if data.get("dev"):
        overrides.append("data.dev.folder=/data/dev")
    overrides += [f"data.test.{i}.folder=/data/test{i}" for i in range(len(data.get("test") or []))]
    return overrides


def write_yaml(path: Path, obj) -> Path:
    path.write_text(yaml.safe_dump(obj, sort_keys=False))
    return path


# --------------------------------------------------------------------- shipped configs


def test_shipped_configs_are_found():
    names = {p.name for p in SHIPPED_CONFIGS}
    assert {"demo.yaml", "full_scale.yaml", "xquad.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_loads_and_validates(path):
    raw = yaml.safe_load(path.read_text())
    cfg = load_config(path, folder_overrides(path))
    validate(cfg)  # idempotent: the loaded config passes again
    assert isinstance(cfg, RunConfig)
    assert cfg.name == raw["name"] == path.stem
    # Every key the file sets is carried into the config (nothing dropped or renamed).
    as_dict = cfg.to_dict()

    def carried(raw_value, value, where: str) -> None:
        if isinstance(raw_value, dict):
            for key, sub in raw_value.items():
                if key != "folder":
                    carried(sub, value[key], f"{where}.{key}")
        elif isinstance(raw_value, list) and raw_value and isinstance(raw_value[0], dict):
            for i, (sub, got) in enumerate(zip(raw_value, value, strict=True)):
                carried(sub, got, f"{where}[{i}]")
        else:
            assert value == raw_value, f"{path.name}: {where}"

    for section, value in raw.items():
        if isinstance(value, dict):
            carried(value, as_dict[section], section)
        else:
            assert as_dict[section] == value, f"{path.name}: {section}"


@pytest.mark.parametrize("name", ["full_scale", "xquad", "squad_xquad_mlqa"])
def test_squad_configs_need_a_data_folder(name):
    path = REPO_ROOT / "configs" / f"{name}.yaml"
    assert "data.train.folder" in refused([], path)
    # ... and every test set's folder, named by the set
    overrides = [o for o in folder_overrides(path) if not o.startswith("data.test.0.")]
    message = refused(overrides, path)
    assert "data.test[0] (xquad): folder is required" in message


def test_demo_config_is_the_default():
    assert DEFAULT_CONFIG == REPO_ROOT / "configs" / "demo.yaml"
    default = load_config(None)
    assert default == load_config(DEFAULT_CONFIG)
    assert default.name == "demo"
    assert default.data.source == "demo" and default.model.name == "tiny"
    assert default.data.train.languages == ["en", "es", "de"]
    assert default.data.test == [] and default.data.dev is None
    assert default.teacher_languages == ["en", "es", "de"]
    # The file's values, not the dataclass defaults, are in effect.
    assert default.teacher.lr == 1e-3 and default.teacher.epochs == 4
    assert default.distill.lookahead_shards == 4
    assert RunConfig().teacher.lr == 1e-5


def test_full_scale_config_carries_the_paper_defaults():
    path = REPO_ROOT / "configs" / "full_scale.yaml"
    cfg = load_config(path, folder_overrides(path))
    assert cfg.strategy.name == "lbmrc" and cfg.strategy.add_english is True
    assert cfg.distill.lambda_nll == 0.5 and cfg.distill.lambda_kd == 0.5
    assert cfg.distill.tau == 2.0
    for role in (cfg.teacher, cfg.student):
        assert role.lr == 1e-5
        assert role.epochs == 10
        assert role.weight_decay == 0.005
    assert cfg.data.train.folder == "/data/train"
    assert [t.name for t in cfg.data.test] == ["xquad", "mlqa"]
    assert [t.folder for t in cfg.data.test] == ["/data/test0", "/data/test1"]


def test_xquad_config_tests_on_every_language_of_the_test_articles():
    path = REPO_ROOT / "configs" / "xquad.yaml"
    cfg = load_config(path, folder_overrides(path))
    assert cfg.train_languages == ["en", "es", "de"]
    assert cfg.teacher_languages == ["en", "es", "de"]
    assert cfg.data.train.split == {"train": [0, 28], "dev": [28, 32]}
    (xquad,) = cfg.data.test
    assert xquad.languages == ["en", "es", "de", "ar", "hi", "vi"] and xquad.articles == [32, 48]
    assert xquad.format == "parallel" and xquad.normalization == "squad"


def test_protocol_config_tests_on_xquad_and_mlqa():
    path = REPO_ROOT / "configs" / "squad_xquad_mlqa.yaml"
    cfg = load_config(path, folder_overrides(path))
    xquad, mlqa = cfg.data.test
    assert (xquad.format, xquad.normalization, len(xquad.languages)) == ("parallel", "squad", 11)
    assert (mlqa.format, mlqa.normalization, len(mlqa.languages)) == ("mlqa", "mlqa", 7)
    assert mlqa.file_pattern == "test-context-{context}-question-{question}.json"
    assert cfg.data.dev is not None and cfg.data.dev.languages == ["en", "es", "de"]


def test_dataclass_defaults_validate():
    validate(RunConfig())


def test_saved_config_loads_back(tmp_path):
    """train.run writes <run>/config.yaml from to_dict(); it must load to the same config."""
    path = REPO_ROOT / "configs" / "squad_xquad_mlqa.yaml"
    cfg = load_config(path, folder_overrides(path) + [f"run_dir={tmp_path / 'run'}", "distill.weights={en: 2, es: 1, de: 1}"])
    saved = write_yaml(tmp_path / "config.yaml", cfg.to_dict())
    assert load_config(saved) == cfg


def test_empty_yaml_file_gives_the_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing set\n")
    assert load_config(path) == RunConfig()


# --------------------------------------------------------------------------- overrides


def test_overrides_nested_keys_with_yaml_typed_values(tmp_path):
    cfg = load_config(None, [
        "student.epochs=2",
        "distill.tau=3",  # an int given for a float
        "data.train.languages=[en, es]",
        "strategy.teachers=[es]",
        "data.demo_noise=null",
        "distill.weights={es: 1}",
        "eval.select_on_dev=false",
        f"run_dir={tmp_path / 'run'}",
        "model.max_length=96",
        "model.doc_stride=32",
    ])
    assert cfg.student.epochs == 2 and type(cfg.student.epochs) is int
    assert cfg.distill.tau == 3.0 and type(cfg.distill.tau) is float
    assert cfg.data.train.languages == ["en", "es"]
    assert cfg.strategy.teachers == ["es"] and cfg.teacher_languages == ["es"]
    assert cfg.data.demo_noise is None
    assert cfg.distill.weights == {"es": 1.0} and type(cfg.distill.weights["es"]) is float
    assert cfg.eval.select_on_dev is False
    assert cfg.run_path == tmp_path / "run"
    assert (cfg.model.max_length, cfg.model.doc_stride) == (96, 32)
    # Untouched keys keep the file's values.
    assert cfg.teacher.epochs == 4 and cfg.student.lr == 1e-3


def test_int_for_float_is_converted_to_float():
    cfg = load_config(None, ["student.lr=1", "distill.imp_sign=1", "distill.disk_budget_gb=5"])
    for value in (cfg.student.lr, cfg.distill.imp_sign, cfg.distill.disk_budget_gb):
        assert type(value) is float
    assert (cfg.student.lr, cfg.distill.imp_sign, cfg.distill.disk_budget_gb) == (1.0, 1.0, 5.0)


def test_overrides_apply_on_top_of_the_file_in_order():
    path = REPO_ROOT / "configs" / "full_scale.yaml"
    cfg = load_config(path, folder_overrides(path) + ["student.epochs=2", "student.epochs=3"])
    assert cfg.student.epochs == 3  # the last one wins
    assert cfg.teacher.epochs == 10  # the file's value, untouched
    assert cfg.student.lr == 1e-5


def test_exponent_without_a_dot_is_a_float_in_overrides_and_files(tmp_path):
    """YAML 1.1 reads 1e-4 as a string; a learning rate written so must still load."""
    assert load_config(None, ["teacher.lr=1e-4"]).teacher.lr == 1e-4
    path = write_yaml(tmp_path / "c.yaml", {"student": {"lr": "3e-5"}})
    path.write_text("student:\n  lr: 3e-5\n")
    assert load_config(path).student.lr == 3e-5
    assert "config key 'teacher.lr' must be float" in refused(["teacher.lr=fast"])


def test_override_value_may_contain_equals_and_spaces_around_key():
    cfg = load_config(None, ["name=a=b", " seed =7"])
    assert cfg.name == "a=b"
    assert cfg.seed == 7


def test_override_without_equals_is_refused():
    message = refused(["student.epochs"])
    assert "student.epochs" in message and "key=value" in message


@pytest.mark.parametrize("override, part", [
    ("seed.x=1", "seed"),
    ("name.sub=1", "name"),
    ("data.source_lang.x=1", "source_lang"),
])
def test_override_through_a_non_section_is_refused(override, part):
    message = refused([override])
    dotted = override.split("=")[0]
    assert f"'{dotted}'" in message and f"'{part}' is not a section" in message


def test_override_through_a_null_key_is_refused():
    message = refused(["data.dev.x=1"], REPO_ROOT / "configs" / "xquad.yaml")  # data.dev: null in the file
    assert "'data.dev.x'" in message


def test_override_indexes_a_list_of_sections():
    path = REPO_ROOT / "configs" / "squad_xquad_mlqa.yaml"
    cfg = load_config(path, folder_overrides(path) + ["data.test.1.languages=[en, de]"])
    assert cfg.data.test[1].languages == ["en", "de"] and cfg.data.test[1].folder == "/data/test1"
    message = refused(folder_overrides(path) + ["data.test.2.folder=/x"], path)
    assert "'data.test.2.folder'" in message and "list of 2" in message


def test_override_value_that_is_not_yaml_is_refused_naming_the_key():
    message = refused(["data.train.languages=[en, es"])
    assert "data.train.languages" in message and "YAML" in message


def test_override_replacing_a_section_with_a_scalar_is_refused():
    message = refused(["data=5"])
    assert "'data'" in message and "mapping" in message


# ------------------------------------------------------------------------ unknown keys


def test_unknown_top_level_key_names_it_and_lists_valid_keys():
    message = refused(["bogus=1"])
    assert "unknown config key 'bogus'" in message
    for valid in ("checkpoint", "data", "distill", "model", "run", "run_dir", "strategy", "student", "teacher"):
        assert valid in message
    assert str(DEFAULT_CONFIG) in message  # and the file it was loaded on top of


def test_unknown_top_level_section_from_a_dotted_override():
    message = refused(["bogus.key=1"])
    assert "unknown config key 'bogus'" in message


@pytest.mark.parametrize("override, valid", [
    ("data.bogus=1", ["train", "dev", "test", "source_lang"]),
    ("data.train.bogus=1", ["folder", "pattern", "languages", "split"]),
    ("distill.tua=2", ["tau", "lambda_kd", "aggregation", "imp_sign"]),
    ("strategy.teacher=[en]", ["name", "teachers", "teacher_data"]),
    ("student.learning_rate=1e-5", ["epochs", "lr", "weight_decay"]),
])
def test_unknown_nested_key_names_the_dotted_key_and_lists_valid_keys(override, valid):
    dotted = override.split("=")[0]
    message = refused([override])
    assert f"unknown config key '{dotted}'" in message
    listed = message.split("valid keys here:")[1]
    for key in valid:
        assert re.search(rf"\b{key}\b", listed), key


def test_unknown_key_in_a_yaml_file_names_the_file(tmp_path):
    path = write_yaml(tmp_path / "run.yaml", {"name": "x", "distill": {"tau": 2, "lambda": 0.5}})
    message = refused([], path)
    assert str(path) in message and "unknown config key 'distill.lambda'" in message


# ------------------------------------------------------------------------- wrong types


@pytest.mark.parametrize("override, key, expected", [
    ("student.epochs=three", "student.epochs", "int"),
    ("teacher.epochs=2.5", "teacher.epochs", "int"),
    ("checkpoint.every=true", "checkpoint.every", "int"),  # a bool is not an int
    ("checkpoint.keep=1.5", "checkpoint.keep", "int"),
    ("run.stall_timeout_s=soon", "run.stall_timeout_s", "float"),
    ("distill.tau=hot", "distill.tau", "float"),
    ("distill.tau=true", "distill.tau", "float"),
    ("eval.select_on_dev=1", "eval.select_on_dev", "bool"),
    ("name=5", "name", "str"),
    ("data.train.languages=en", "data.train.languages", "list"),
    ("data.train.languages=[en, 5]", "data.train.languages[1]", "str"),
    ("model.tiny.hidden_size=big", "model.tiny.hidden_size", "int"),
    ("model.tiny=[1, 2]", "model.tiny", "mapping"),
    ("distill.weights={en: heavy}", "distill.weights.en", "float"),
    ("data.train.split={train: [0, a], dev: [1, 2], test: [2, 3]}", "data.train.split.train[1]", "int"),
    ("model=tiny", "model", "mapping"),
])
def test_wrong_type_names_the_key(override, key, expected):
    message = refused([override])
    assert f"config key '{key}' must be" in message
    assert expected in message.split("must be", 1)[1]


def test_wrong_type_in_a_yaml_file_names_file_and_key(tmp_path):
    path = write_yaml(tmp_path / "run.yaml", {"teacher": {"lr": "fast"}})
    message = refused([], path)
    assert str(path) in message and "'teacher.lr'" in message


# ------------------------------------------------------------------ invalid enum values


@pytest.mark.parametrize("override, key", [
    ("strategy.name=distill", "strategy.name"),
    ("strategy.teacher_data=mix", "strategy.teacher_data"),
    ("strategy.translate_train=all", "strategy.translate_train"),
    ("distill.aggregation=mean", "distill.aggregation"),
    ("distill.imp_sign=0", "distill.imp_sign"),
    ("distill.imp_sign=0.5", "distill.imp_sign"),
    ("distill.imp_sign=-2", "distill.imp_sign"),
    ("distill.store_mode=disk", "distill.store_mode"),
    ("distill.logits_dtype=float32", "distill.logits_dtype"),
    ("data.source=hub", "data.source"),
    ("data.normalization=bleu", "data.normalization"),
])
def test_invalid_enum_value_is_refused_naming_the_key(override, key):
    message = refused([override])
    assert key in message


@pytest.mark.parametrize("override", [
    "strategy.name=zero_shot", "strategy.name=translate_train", "strategy.name=mixmrc",
    "distill.aggregation=hyper", "distill.imp_sign=1", "distill.imp_sign=-1",
    "distill.store_mode=cache", "distill.logits_dtype=bfloat16",
    "strategy.teacher_data=mixmrc", "strategy.translate_train=per_language", "data.normalization=mlqa",
])
def test_valid_enum_values_are_accepted(override):
    key, value = override.split("=")
    cfg = load_config(None, [override])
    section, name = key.split(".")
    got = getattr(getattr(cfg, section), name)
    assert got == yaml.safe_load(value)


@pytest.mark.parametrize("override, key", [
    ("distill.tau=0", "distill.tau"),
    ("distill.lookahead_shards=0", "distill.lookahead_shards"),
    ("distill.weights={en: 1, es: -1, de: 1}", "distill.weights"),
    ("teacher.epochs=0", "teacher.epochs"),
    ("student.lr=0", "student.lr"),
    ("student.grad_accum=0", "student"),
    ("checkpoint.every=0", "checkpoint.every"),
    ("checkpoint.keep=0", "checkpoint.keep"),
    ("run.stall_timeout_s=0", "run.stall_timeout_s"),
    ("distill.weights={en: 0, es: 0, de: 0}", "distill.weights"),
    ("data.train.languages=[en, es, en]", "data.train.languages"),
    ("data.train.split={train: [0, 5], dev: [5, 6]}", "data.train.split"),
    ("data.train.split={train: [5, 0], dev: [5, 6], test: [6, 8]}", "data.train.split.train"),
    ("strategy.teachers=[]", "strategy.teachers"),
])
def test_out_of_range_values_are_refused_naming_the_key(override, key):
    assert key in refused([override])


# ------------------------------------------------------------- cross-field consistency


def test_teacher_without_a_training_branch_is_refused():
    message = refused(["strategy.teachers=[en, fr]"])
    assert "strategy.teachers" in message and "'fr'" in message and "no training branch" in message


def test_zero_shot_test_language_cannot_be_a_teacher():
    path = REPO_ROOT / "configs" / "xquad.yaml"
    message = refused(folder_overrides(path) + ["strategy.teachers=[en, ar]"], path)
    assert "strategy.teachers" in message and "'ar'" in message
    # the same teachers minus the test-only language are fine
    cfg = load_config(path, folder_overrides(path) + ["strategy.teachers=[en, es]"])
    assert cfg.teacher_languages == ["en", "es"]


@pytest.mark.parametrize("override, key", [
    ("data.test=[{name: x, folder: /d, format: squad2, languages: [en]}]", "format must be one of parallel, mlqa"),
    ("data.test=[{name: x, folder: /d, normalization: nfkc, languages: [en]}]", "normalization must be squad or mlqa"),
    ("data.test=[{name: x, folder: /d, languages: []}]", "languages must be a non-empty list"),
    ("data.test=[{folder: /d, languages: [en]}]", "name is required"),
    ("data.test=[{name: x, folder: /d, languages: [en]}, {name: x, folder: /e, languages: [de]}]", "used by two"),
    ("data.test=[{name: x, folder: /d, languages: [en], pattern: 'x.json'}]", "must contain {lang}"),
    ("data.test=[{name: x, folder: /d, languages: [en], format: mlqa, pattern: 'c-{context}.json'}]",
     "must contain {question}"),
    ("data.test=[{name: x, folder: /d, languages: [en], format: mlqa, articles: [0, 2]}]",
     "articles is for format parallel"),
    ("data.train.split={train: [0, 5]}", "no dev range"),
    ("data.train.split={train: [0, 5], dev: [5, 6]}", "no test range"),
    ("data.train.split={train: [0, 5], dev: [5, 6], tset: [6, 8]}", "unknown split(s) ['tset']"),
    ("data.dev={folder: /d, languages: [en]}", "lacks training language(s) ['es', 'de']"),
])
def test_bad_test_and_dev_sets_are_refused_naming_the_set(override, key):
    message = refused([override])
    assert key in message
    if override.startswith("data.test"):
        assert "data.test[" in message


def test_test_set_name_and_normalization_are_reported_in_the_message():
    message = refused(["data.test=[{name: mlqa_dev, folder: /d, normalization: x, languages: [en]}]"])
    assert "data.test[0] (mlqa_dev)" in message


def test_source_language_must_be_a_language():
    message = refused(["data.source_lang=fr"])
    assert "data.source_lang" in message and "'fr'" in message


def test_fixed_weights_must_cover_every_teacher():
    message = refused(["distill.aggregation=hyper", "distill.weights={en: 1, es: 1}"])
    assert "distill.weights" in message and "de" in message
    # a teacher subset needs weights for that subset only
    cfg = load_config(None, ["distill.aggregation=hyper", "strategy.teachers=[en, es]",
                             "distill.weights={en: 1, es: 1}"])
    assert cfg.distill.weights == {"en": 1.0, "es": 1.0}


@pytest.mark.parametrize("stride, length", [(160, 160), (200, 160), (64, 64)])
def test_doc_stride_must_be_smaller_than_max_length(stride, length):
    message = refused([f"model.doc_stride={stride}", f"model.max_length={length}"])
    assert "model.doc_stride" in message and "model.max_length" in message


def test_doc_stride_just_below_max_length_is_accepted():
    cfg = load_config(None, ["model.doc_stride=159", "model.max_length=160"])
    assert cfg.model.doc_stride == 159


def test_squad_source_needs_a_folder():
    assert "data.train.folder" in refused(["data.source=squad"])


def test_validate_checks_a_config_built_in_code():
    cfg = RunConfig()
    cfg.strategy.teachers = ["xx"]
    with pytest.raises(ConfigError, match=r"strategy\.teachers names 'xx'"):
        validate(cfg)


# ---------------------------------------------------------------------- config files


def test_missing_config_file_is_refused_naming_it(tmp_path):
    path = tmp_path / "nope.yaml"
    message = refused([], path)
    assert str(path) in message and "not found" in message


def test_config_path_that_is_a_directory_is_refused_naming_it(tmp_path):
    message = refused([], tmp_path)
    assert str(tmp_path) in message


def test_yaml_that_does_not_parse_is_refused_naming_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\ndata:\n  languages: [en, es\nmodel:\n  name: tiny\n")
    message = refused([], path)
    assert str(path) in message and "not valid YAML" in message
    assert re.search(r"line \d+", message)


def test_yaml_that_is_not_a_mapping_is_refused(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- name: x\n- seed: 1\n")
    message = refused([], path)
    assert str(path) in message and "mapping" in message


# ------------------------------------------------------------------- DeepSpeed configs


@pytest.mark.parametrize("path", SHIPPED_DS_CONFIGS, ids=lambda p: p.stem)
def test_shipped_deepspeed_configs_parse(path):
    config = load_ds_config(path)
    stage = int(re.match(r"zero(\d)", path.stem).group(1))
    assert config["zero_optimization"]["stage"] == stage
    assert config["optimizer"]["type"] == "AdamW"
    assert config["optimizer"]["params"]["eps"] == 1e-8  # the paper's AdamW eps
    assert load_ds_config(str(path)) == config


def test_deepspeed_config_with_a_syntax_error_names_file_line_and_column(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{\n  "train_micro_batch_size_per_gpu": 8,\n  "gradient_accumulation_steps": 1\n'
                    '  "zero_optimization": {"stage": 2}\n}\n')
    with pytest.raises(ValueError) as info:
        load_ds_config(path)
    message = str(info.value)
    assert str(path) in message
    assert "line 4 column 3" in message


def test_deepspeed_config_with_a_trailing_comma(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{\n  "zero_optimization": {"stage": 2},\n}\n')
    with pytest.raises(ValueError, match=re.escape(str(path)) + r", line 3 column 1"):
        load_ds_config(path)


def test_missing_deepspeed_config_is_refused_naming_it(tmp_path):
    path = tmp_path / "missing.json"
    with pytest.raises(ValueError) as info:
        load_ds_config(path)
    assert str(path) in str(info.value) and "cannot read" in str(info.value)


def test_deepspeed_config_must_be_a_json_object(tmp_path):
    path = tmp_path / "list.json"
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match=re.escape(str(path))):
        load_ds_config(path)


def test_deepspeed_config_dict_is_copied():
    source = {"zero_optimization": {"stage": 2}}
    config = load_ds_config(source)
    config["zero_optimization"]["stage"] = 3
    assert source == {"zero_optimization": {"stage": 2}}


# ------------------------------------------------------------------------ entry point


def test_parse_args_defaults_and_overrides():
    args = train.parse_args([])
    assert args.deepspeed == "ds_configs/zero2.json" and args.config is None and args.stage == "all"
    assert args.overrides == []
    args = train.parse_args(["--deepspeed_config", "ds.json", "--config", "c.yaml", "--stage", "distill",
                             "--local_rank=1", "student.epochs=2", "run_dir=/tmp/r"])
    assert (args.deepspeed, args.config, args.stage, args.local_rank) == ("ds.json", "c.yaml", "distill", 1)
    assert args.overrides == ["student.epochs=2", "run_dir=/tmp/r"]


def test_parse_args_refuses_an_unknown_stage(capsys):
    with pytest.raises(SystemExit) as info:
        train.parse_args(["--stage", "students"])
    assert info.value.code == 2
    assert "--stage" in capsys.readouterr().err


@pytest.fixture
def no_run(monkeypatch):
    """Fail the test if main gets as far as starting the run."""
    def forbidden(*args, **kwargs):
        raise AssertionError("main started the run despite a bad configuration")
    monkeypatch.setattr(train, "run", forbidden)


def test_main_refuses_a_bad_key_before_running(tmp_path, no_run):
    with pytest.raises(SystemExit) as info:
        train.main(["--deepspeed", str(REPO_ROOT / "ds_configs" / "zero2.json"),
                    f"run_dir={tmp_path / 'run'}", "distill.tua=2"])
    assert "configuration error" in str(info.value.code) and "distill.tua" in str(info.value.code)
    assert not (tmp_path / "run").exists()


def test_main_refuses_a_broken_deepspeed_config_before_running(tmp_path, no_run):
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": 2,}}')
    with pytest.raises(SystemExit) as info:
        train.main(["--deepspeed", str(ds), f"run_dir={tmp_path / 'run'}"])
    assert str(ds) in str(info.value.code) and "line 1 column" in str(info.value.code)
    assert not (tmp_path / "run").exists()


def test_main_passes_a_good_config_to_run(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(train, "run", lambda cfg, ds, stage, redo: seen.update(cfg=cfg, ds=ds, stage=stage))
    train.main(["--deepspeed", str(REPO_ROOT / "ds_configs" / "zero3.json"), "--stage", "teachers",
                f"run_dir={tmp_path / 'run'}", "student.epochs=1"])
    assert seen["stage"] == "teachers" and seen["ds"]["zero_optimization"]["stage"] == 3
    assert seen["cfg"].student.epochs == 1 and seen["cfg"].run_path == tmp_path / "run"


def run_entry_point(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return subprocess.run([sys.executable, "dist_xqa/train.py", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def assert_refused_cleanly(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0, proc.stdout + proc.stderr
    output = proc.stdout + proc.stderr
    assert "configuration error" in output
    for needle in needles:
        assert needle in output, output
    assert "Traceback" not in output, output  # a message, not a crash


def test_entry_point_refuses_an_unknown_key(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_entry_point("--deepspeed", "ds_configs/zero2.json", "bogus.key=1", f"run_dir={run_dir}")
    assert_refused_cleanly(proc, "unknown config key 'bogus'")
    assert not run_dir.exists()


def test_entry_point_refuses_a_broken_deepspeed_config(tmp_path):
    run_dir = tmp_path / "run"
    ds = tmp_path / "broken_ds.json"
    ds.write_text('{\n  "train_micro_batch_size_per_gpu": 8\n  "zero_optimization": {"stage": 2}\n}\n')
    proc = run_entry_point("--deepspeed", str(ds), f"run_dir={run_dir}")
    assert_refused_cleanly(proc, str(ds), "line 3 column 3")
    assert not run_dir.exists()


def test_entry_point_refuses_a_teacher_without_a_branch(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_entry_point("--deepspeed", "ds_configs/zero2.json", "strategy.teachers=[en, fr]",
                           f"run_dir={run_dir}")
    assert_refused_cleanly(proc, "strategy.teachers", "'fr'")
    assert not run_dir.exists()


def test_entry_point_refuses_an_override_that_is_not_yaml(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_entry_point("data.train.languages=[en, es", f"run_dir={run_dir}")
    assert_refused_cleanly(proc, "data.train.languages")
    assert not run_dir.exists()


# ------------------------------------------------------------------ data-dependent checks

CITIES = ["Lyon", "Porto", "Graz", "Turin", "Ghent", "Bergen", "Split", "Cork", "Basel", "Malmo"]
PHRASES = {"en": ("The river passes", "Where does the river pass?"),
           "es": ("El río pasa por", "¿Por dónde pasa el río?"),
           "de": ("Der Fluss fließt durch", "Wo fließt der Fluss durch?")}


def squad_file(lang: str, n_articles: int = 10, answerable: bool = True) -> dict:
    """A tiny SQuAD v1.1 object; ids are shared across languages so they align."""
    articles = []
    for a in range(n_articles):
        city = CITIES[a % len(CITIES)]
        context = f"{PHRASES[lang][0]} {city} in article {a}."
        answers = [{"text": city, "answer_start": context.index(city)}] if answerable else []
        articles.append({"title": f"article {a}", "paragraphs": [{"context": context, "qas": [
            {"id": f"q{a}", "question": f"{PHRASES[lang][1]} ({a})", "answers": answers}]}]})
    return {"version": "1.1", "data": articles}


def squad_folder(tmp_path: Path, files: dict[str, dict]) -> Path:
    folder = tmp_path / "squad"
    folder.mkdir()
    for lang, obj in files.items():
        (folder / f"toy.{lang}.json").write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")
    return folder


def squad_config(tmp_path: Path, folder: Path, *extra: str) -> RunConfig:
    return load_config(None, [f"run_dir={tmp_path / 'run'}", "data.source=squad", f"data.train.folder={folder}",
                              "model.name=tiny", *extra])


@pytest.mark.parametrize("empty", [
    {"version": "1.1", "data": []},  # no articles at all
    squad_file("es", answerable=False),  # every question rejected (no answers)
], ids=["no-articles", "all-rejected"])
def test_language_with_no_usable_examples_is_refused_naming_it(tmp_path, empty):
    from dist_xqa.prepare import prepare

    folder = squad_folder(tmp_path, {"en": squad_file("en"), "es": empty, "de": squad_file("de")})
    cfg = squad_config(tmp_path, folder)
    with pytest.raises(ConfigError) as info:
        prepare(cfg)
    message = str(info.value)
    assert "'es'" in message and "data.train.languages" in message and str(folder) in message
    assert "'en'" not in message and "'de'" not in message
    assert not (tmp_path / "run" / "prepared" / "prepared.json").exists()
    assert not (tmp_path / "run" / "prepared" / "tokenizer").exists()


def test_language_without_a_file_is_refused_naming_it(tmp_path):
    from dist_xqa.prepare import prepare

    folder = squad_folder(tmp_path, {"en": squad_file("en"), "es": squad_file("es")})
    cfg = squad_config(tmp_path, folder)  # languages en, es, de: no de file
    with pytest.raises(ConfigError) as info:  # train.run reports it, every rank stops
        prepare(cfg)
    assert "'de'" in str(info.value) and "toy.de.json" not in os.listdir(folder)
    assert "*.de.json" in str(info.value)


def test_data_folder_that_is_not_a_directory_is_refused(tmp_path):
    from dist_xqa.prepare import prepare

    cfg = squad_config(tmp_path, tmp_path / "nowhere")
    with pytest.raises(ConfigError, match=r"data\.train\.folder .*nowhere"):
        prepare(cfg)


def test_run_dir_prepared_with_other_tokenizer_settings_is_refused(tmp_path):
    from dist_xqa.prepare import prepare

    folder = squad_folder(tmp_path, {lang: squad_file(lang) for lang in ("en", "es", "de")})
    prepared = prepare(squad_config(tmp_path, folder))
    assert prepared.settings.max_length == 160 and prepared.settings.doc_stride == 64
    # the same settings again: reused, not refused
    assert prepare(squad_config(tmp_path, folder)).info == prepared.info
    for changed in ("model.max_length=128", "model.doc_stride=32"):
        with pytest.raises(ConfigError) as info:
            prepare(squad_config(tmp_path, folder, changed))
        assert str(tmp_path / "run") in str(info.value) and "different" in str(info.value)


def test_one_tiny_model_size_is_overridden_the_others_kept():
    cfg = load_config(None, ["model.tiny.num_hidden_layers=1"])
    assert cfg.model.tiny["num_hidden_layers"] == 1
    assert cfg.model.tiny["hidden_size"] == load_config(None).model.tiny["hidden_size"]


def test_negative_doc_stride_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match="model.doc_stride"):
        load_config(None, ["model.doc_stride=-1"])


def test_run_and_checkpoint_sections_replace_the_old_keys():
    cfg = load_config(None, ["run.stall_timeout_s=60", "checkpoint.every=7"])
    assert (cfg.run.stall_timeout_s, cfg.checkpoint.every, cfg.checkpoint.keep) == (60.0, 7, 2)
    assert load_config().run.stall_timeout_s == 1800.0
    assert "unknown config key 'checkpoint_every'" in refused(["checkpoint_every=5"])
    assert "unknown config key 'distill.wait_timeout_s'" in refused(["distill.wait_timeout_s=5"])


def test_weights_zero_only_for_teachers_left_out_are_accepted():
    message = refused(["distill.aggregation=hyper", "strategy.teachers=[es]", "distill.weights={en: 1, es: 0}"])
    assert "distill.weights" in message and "all zero" in message
    cfg = load_config(None, ["distill.aggregation=hyper", "distill.weights={en: 0, es: 1, de: 0}"])
    assert cfg.distill.weights["es"] == 1.0


def test_monitor_interval_and_loader_workers_are_validated_keys():
    import torch

    from dist_xqa.roles.student import loader_workers

    cfg = load_config()
    assert (cfg.monitor.every, cfg.run.loader_workers) == (10, "auto")
    cfg = load_config(None, ["monitor.every=3", "run.loader_workers=4"])
    assert (cfg.monitor.every, cfg.run.loader_workers) == (3, 4)
    assert "monitor.every must be at least 1" in refused(["monitor.every=0"])
    for bad in ("-1", "many"):
        assert "run.loader_workers must be auto or a number" in refused([f"run.loader_workers={bad}"])
    assert "'run.loader_workers' must be int or str" in refused(["run.loader_workers=true"])
    # auto: workers beside a GPU's training process, none on CPU (the read-ahead thread)
    assert loader_workers(torch.device("cpu")) == 0 and loader_workers(torch.device("cuda")) == 2
    assert loader_workers(torch.device("cpu"), 3) == 3 and loader_workers(torch.device("cuda"), 0) == 0
