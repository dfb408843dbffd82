"""Safe reruns (dist_xqa/stages.py): which settings each stage records, what a changed
setting makes a rerun do, and the real entry point refusing a changed distillation key
and then, with --redo, redoing the student alone."""
from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from dist_xqa import stages, train
from dist_xqa.config import ConfigError, load_config
from dist_xqa.logits import Manifest, ShardPlan, StoreMismatchError, prepare_store

XSTA = Path(__file__).resolve().parents[1] / "configs" / "demo_xsta.yaml"
SKD = Path(__file__).resolve().parents[1] / "configs" / "demo_skd.yaml"


def changed_stages(*overrides: str, config: Path | None = None) -> set[str]:
    """The stages whose recorded settings a rerun with `overrides` finds changed."""
    before, after = load_config(config), load_config(config, list(overrides))
    names = stages.stage_names(before, ["en", "es", "de"])
    return {s for s in names if stages.diff(stages.stage_settings(before, s), stages.stage_settings(after, s))}


@pytest.mark.parametrize("override,expected", [
    ("distill.lambda_kd=0.7", {"distill"}),
    ("distill.aggregation=hyper", {"distill"}),
    ("distill.store_topk=8", {"distill"}),
    ("student.lr=1e-4", {"distill"}),
    ("student.global_batch_size=32", {"distill"}),
    ("teacher.lr=1e-4", {"teachers"}),
    ("teacher.epochs=2", {"teachers"}),
    ("data.demo_articles=30", {"teachers", "distill"}),
    ("model.tiny.num_hidden_layers=1", {"teachers", "distill"}),
    ("seed=3", {"teachers", "distill"}),
    ("strategy.teachers=[en,es]", {"teachers", "distill"}),
    ("eval.select_on_dev=false", {"teachers", "distill"}),  # which epoch is kept
    ("eval.n_best=5", {"teachers", "distill", "evaluate"}),  # dev selection decodes too
    ("eval.max_answer_length=10", {"teachers", "distill", "evaluate"}),
    # how a run goes, not what it computes
    ("checkpoint.every=5", set()), ("checkpoint.keep=4", set()), ("run.stall_timeout_s=10", set()),
    ("distill.lookahead_shards=3", set()), ("distill.store_mode=cache", set()), ("distill.disk_budget_gb=1", set()),
    ("eval.batch_size=8", set()), ("run_dir=/elsewhere", set()), ("name=other", set()),
    # test sets are scored, never trained on: the evaluator rescores them itself
    ("data.test=[{name: extra, folder: /x, languages: [en]}]", set()),
])
def test_each_key_changes_the_stages_that_depend_on_it(override, expected):
    assert changed_stages(override) == expected


@pytest.mark.parametrize("override,expected", [
    ("strategy.xsta.gamma=0.5", {"distill"}),
    ("strategy.xsta.share_layer=1", {"distill"}),
    # act at evaluation only: the evaluator rescores on them, no retraining
    ("strategy.xsta.translate_test=false", set()),
    ("strategy.xsta.calibrate_at_inference=false", set()),
])
def test_xsta_method_keys_change_its_student_and_nothing_else(override, expected):
    assert changed_stages(override, config=XSTA) == expected
    assert "teachers" not in stages.stage_names(load_config(XSTA), [])  # X-STA has no phase 1


def test_skd_method_keys_change_the_student_not_its_phase1_model():
    assert changed_stages("strategy.skd.alpha_kl=2.0", config=SKD) == {"distill"}
    assert changed_stages("teacher.lr=1e-4", config=SKD) == {"teachers"}


def test_baselines_have_no_distill_stage():
    cfg = load_config(None, ["strategy.name=mixmrc"])
    assert stages.stage_names(cfg, ["mixmrc"]) == ["teachers", "evaluate"]


OUTPUTS = {"teachers": ["teachers/"], "distill": ["student/", "logits/"], "evaluate": ["eval/"]}


def settings(cfg_overrides=(), weights=None) -> dict[str, dict]:
    cfg = load_config(None, list(cfg_overrides))
    return {s: stages.stage_settings(cfg, s, weights or {"en": "a" * 64}) for s in stages.STAGES}


def test_a_changed_key_is_refused_naming_it_and_the_redo_command():
    recorded, current = settings(), settings(["distill.lambda_kd=0.7"])
    to_redo, refusal = stages.decide(recorded, current, set(), OUTPUTS)
    assert to_redo == []
    assert "  distill: distill.lambda_kd: 0.5 -> 0.7\n" in refusal
    assert "--redo distill to remove student/, logits/, eval/ and redo them" in refusal
    assert "teachers:" not in refusal, "only the stages that differ are listed"


def test_redo_covers_the_named_stage_and_what_depends_on_it():
    recorded, current = settings(), settings(["distill.lambda_kd=0.7"])
    assert stages.decide(recorded, current, {"distill"}, OUTPUTS) == (["distill", "evaluate"], None)
    assert stages.decide(recorded, current, {"teachers"}, OUTPUTS) == (list(stages.STAGES), None)
    to_redo, refusal = stages.decide(recorded, current, {"evaluate"}, OUTPUTS)
    assert to_redo == [] and "--redo distill " in refusal, "redoing a later stage does not cover the change"
    # an explicit --redo redoes even an unchanged stage
    assert stages.decide(recorded, recorded, {"evaluate"}, OUTPUTS) == (["evaluate"], None)
    assert stages.decide(recorded, recorded, set(), OUTPUTS) == ([], None)


def test_a_change_in_two_stages_asks_for_the_earlier_one():
    recorded, current = settings(), settings(["teacher.epochs=9", "student.epochs=8"])
    _, refusal = stages.decide(recorded, current, set(), OUTPUTS)
    demo = load_config()
    assert f"teacher.epochs: {demo.teacher.epochs} -> 9" in refusal
    assert f"student.epochs: {demo.student.epochs} -> 8" in refusal
    assert "--redo teachers to remove teachers/, student/, logits/, eval/" in refusal


def test_stages_without_a_record_are_not_compared():
    recorded = {"teachers": settings()["teachers"], "distill": None, "evaluate": None}
    assert stages.decide(recorded, settings(["distill.tau=1.0"]), set(), OUTPUTS) == ([], None)


def test_a_retrained_teacher_changes_the_students_record():
    recorded, current = settings(weights={"en": "a" * 64}), settings(weights={"en": "b" * 64})
    _, refusal = stages.decide(recorded, current, set(), OUTPUTS)
    assert f"weights.en: {'a' * 12} -> {'b' * 12}" in refusal
    gone = settings(weights={"en": stages.NOT_TRAINED})
    assert "weights.en: aaaaaaaaaaaa -> (not trained)" in stages.decide(recorded, gone, set(), OUTPUTS)[1]


def fake_run(run_dir: Path) -> dict[Path, str]:
    """A finished run's files as the stages leave them (without training): teachers with
    weights, the student, its checkpoints and store, the results; records written as the
    entry point writes them. Returns every file's SHA-256."""
    cfg = load_config(None, [f"run_dir={run_dir}"])
    for i, lang in enumerate(("en", "es", "de")):
        (run_dir / "teachers" / lang).mkdir(parents=True)
        (run_dir / "teachers" / lang / "model.safetensors").write_bytes(bytes([i]) * 64)
        (run_dir / "teachers" / lang / "DONE.json").write_text("{}")
        (run_dir / "checkpoints" / f"teacher_{lang}").mkdir(parents=True)
        (run_dir / "checkpoints" / f"teacher_{lang}" / "latest").write_text("global_step3")
    stages.record(cfg, "teachers")
    store = Manifest.for_plan(ShardPlan(range(8), shard_size=4, seed=0), "tok", stages.phase1_weights(cfg))
    prepare_store(run_dir / "logits", store)
    for path in ("student/model.safetensors", "student/DONE.json", "checkpoints/student/latest",
                 "logits/en/shard_000000.pt", "logits/progress.json", "logits/en/heartbeat.json",
                 "skd/teacher_gen0/config.json", "eval/student.json",
                 "heartbeats/student.0.json", "heartbeats/teacher_en.0.json", "tb/student/events.out.tfevents.1",
                 "tb/teacher_en/events.out.tfevents.1", "tb/eval/events.out.tfevents.1", "trace/student.0.jsonl"):
        (run_dir / path).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / path).write_text(path)
    stages.record(cfg, "distill")
    stages.record(cfg, "evaluate")
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in run_dir.rglob("*") if p.is_file()}


def test_a_key_added_to_the_config_since_a_record_counts_at_its_default(tmp_path):
    """A record written before a key existed holds no value for it: the stage was made with
    what the key's default computes. Only a rerun that sets the key otherwise differs."""
    run_dir = tmp_path / "run"
    fake_run(run_dir)
    record = run_dir / "stages" / "distill.json"
    data = json.loads(record.read_text())
    assert data["settings"].pop("distill.tau") == 2.0  # as if the key were newer than the record
    record.write_text(json.dumps(data))
    stages.check_rerun(load_config(None, [f"run_dir={run_dir}", "distill.tau=2.0"]), set())  # the default
    with pytest.raises(ConfigError, match=r"distill\.tau: 2\.0 -> 1\.5"):
        stages.check_rerun(load_config(None, [f"run_dir={run_dir}", "distill.tau=1.5"]), set())


def test_a_mapping_key_set_in_the_record_is_not_taken_for_a_later_key_at_its_null_default(tmp_path):
    """data.train.split defaults to null and is recorded as its entries when set: the rerun
    of the very same command matches its record; a changed range is still refused."""
    squad = ["data.source=squad", f"data.train.folder={tmp_path}", "data.train.languages=[en, es]"]
    split = "data.train.split={train: [0, 2], dev: [2, 3], test: [3, 4]}"
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", *squad, split])
    stages.record(cfg, "teachers")
    assert "data.train.split.dev" in json.loads((tmp_path / "run" / "stages" / "teachers.json").read_text())["settings"]
    stages.check_rerun(cfg, set())
    moved = load_config(None, [f"run_dir={tmp_path / 'run'}", *squad, split.replace("dev: [2, 3]", "dev: [2, 4]")])
    with pytest.raises(ConfigError, match=r"data\.train\.split\.dev: \[2, 3\] -> \[2, 4\]"):
        stages.check_rerun(moved, set())


def test_check_rerun_refuses_then_redo_removes_exactly_the_student_and_what_follows(tmp_path):
    run_dir = tmp_path / "run"
    files = fake_run(run_dir)
    assert json.loads((run_dir / "stages" / "distill.json").read_text())["settings"]["weights.en"] == \
        hashlib.sha256(b"model.safetensors\x0064\x00" + bytes([0]) * 64).hexdigest()
    stages.check_rerun(load_config(None, [f"run_dir={run_dir}", "checkpoint.every=7"]), set())  # nothing to redo
    changed = load_config(None, [f"run_dir={run_dir}", "distill.lambda_kd=0.7"])
    with pytest.raises(ConfigError, match=r"distill\.lambda_kd: 0\.5 -> 0\.7(.|\n)*--redo distill"):
        stages.check_rerun(changed, set())
    assert all(p.exists() for p in files), "a refusal removes nothing"

    stages.check_rerun(changed, {"distill"})
    kept = {p: h for p, h in files.items() if p.exists()}
    gone = sorted(str(p.relative_to(run_dir)) for p in set(files) - set(kept))
    assert gone == ["checkpoints/student/latest", "eval/student.json", "heartbeats/student.0.json",
                    "logits/en/heartbeat.json", "logits/progress.json", "skd/teacher_gen0/config.json",
                    "stages/distill.json", "stages/evaluate.json", "student/DONE.json", "student/model.safetensors",
                    "tb/eval/events.out.tfevents.1", "tb/student/events.out.tfevents.1", "trace/student.0.jsonl"]
    assert all(hashlib.sha256(p.read_bytes()).hexdigest() == h for p, h in kept.items())
    assert {"logits/manifest.json", "logits/en/shard_000000.pt"} <= {str(p.relative_to(run_dir)) for p in kept}, \
        "the teachers' logits do not depend on the student: the store stays"
    stages.check_rerun(changed, set())  # the teachers' record still matches: nothing left to refuse


def store_files(run_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(run_dir)) for p in (run_dir / "logits").rglob("*") if p.is_file()
                  and not p.name.startswith("."))


@pytest.mark.parametrize("override,part", [("distill.store_topk=8", "topk (None != expected 8)"),
                                           ("distill.logits_dtype=bfloat16", "dtype ('float16' != expected 'bfloat16')"),
                                           ("distill.placebo_shuffle=true", "placebo (None != expected 0)")])
def test_redo_distill_drops_a_store_that_no_longer_matches_the_run_naming_the_part(tmp_path, override, part, caplog):
    run_dir = tmp_path / "run"
    fake_run(run_dir)
    with caplog.at_level("INFO", logger="dist_xqa.stages"):
        stages.check_rerun(load_config(None, [f"run_dir={run_dir}", override]), {"distill"})
    assert store_files(run_dir) == []
    assert part in caplog.text and "--redo store (it does not match this run" in caplog.text


def test_redo_distill_drops_the_store_of_a_teacher_changed_since(tmp_path):
    run_dir = tmp_path / "run"
    fake_run(run_dir)
    (run_dir / "teachers" / "de" / "model.safetensors").write_bytes(b"retrained elsewhere")
    cfg = load_config(None, [f"run_dir={run_dir}"])
    before = hashlib.sha256(b"model.safetensors\x0064\x00" + bytes([2]) * 64).hexdigest()[:12]
    now = hashlib.sha256(b"model.safetensors\x0019\x00retrained elsewhere").hexdigest()[:12]
    assert stages.store_differences(cfg, stages.phase1_weights(cfg)) == [
        f"teacher 'de' checkpoint (hash {before} != expected {now})"]
    stages.check_rerun(cfg, {"distill"})
    assert store_files(run_dir) == []


def test_redo_store_drops_the_store_alone_and_refuses_a_shared_one(tmp_path):
    run_dir = tmp_path / "run"
    files = fake_run(run_dir)
    cfg = load_config(None, [f"run_dir={run_dir}"])
    assert stages.store_differences(cfg, stages.phase1_weights(cfg)) == []
    stages.check_rerun(cfg, {"store"})
    gone = sorted(str(p.relative_to(run_dir)) for p in files if not p.exists())
    assert gone == ["logits/.lock", "logits/en/heartbeat.json", "logits/en/shard_000000.pt", "logits/manifest.json",
                    "logits/progress.json"], "the store alone; the student and its records stay"
    shared = load_config(None, [f"run_dir={run_dir}", f"distill.store_dir={tmp_path / 'shared'}"])
    with pytest.raises(ConfigError, match="--redo store: this run's logits are in distill.store_dir .*shared"):
        stages.check_rerun(shared, {"distill", "store"})


def test_redo_distill_keeps_a_shared_store_and_skd_drops_its_own(tmp_path):
    run_dir = tmp_path / "run"
    fake_run(run_dir)
    shared = tmp_path / "shared"
    prepare_store(shared, Manifest.for_plan(ShardPlan(range(8), 4, 0), "tok", {"en": "other teachers"}))
    stages.check_rerun(load_config(None, [f"run_dir={run_dir}", f"distill.store_dir={shared}"]), {"distill"})
    assert (shared / "manifest.json").exists(), "a shared store is never removed by a rerun"
    assert "logits/manifest.json" in store_files(run_dir)
    skd = load_config(SKD)
    assert "logits/" in stages.stage_outputs(skd, "distill"), "SKD's store holds the student's own generations"
    assert "logits/" not in stages.stage_outputs(load_config(None), "distill")


@pytest.mark.parametrize("change,prepared_kept", [("teacher.lr=1e-4", True), ("data.demo_articles=30", False)])
def test_redoing_the_teachers_removes_every_stage_and_a_stale_data_preparation(tmp_path, change, prepared_kept):
    run_dir = tmp_path / "run"
    files = fake_run(run_dir)
    cfg = load_config(None, [f"run_dir={run_dir}"])
    (run_dir / "prepared").mkdir()
    (run_dir / "prepared" / "prepared.json").write_text(json.dumps({"fingerprint": stages.fingerprint(cfg, stages.PREPARED_KEYS)}))
    changed = load_config(None, [f"run_dir={run_dir}", change])
    with pytest.raises(ConfigError, match=f"  teachers: {change.split('=')[0]}"):
        stages.check_rerun(changed, {"distill"})
    stages.check_rerun(changed, {"teachers"})
    assert not any(p.exists() for p in files), "the teachers and every stage after them"
    assert (run_dir / "prepared").exists() == prepared_kept


def test_the_prepared_data_fingerprint_hashes_exactly_its_key_selection():
    """The data preparation's fingerprint (stages.PREPARED_KEYS through stages.fingerprint)
    is the hash of the data (without its test sets), model, strategy (without the
    methods' loss options) and seed, as written in the prepared.json of existing runs."""
    import dataclasses

    cfg = load_config(SKD)
    tree = dataclasses.asdict(cfg)
    relevant = {"data": {k: v for k, v in tree["data"].items() if k != "test"}, "model": tree["model"],
                "strategy": {k: v for k, v in tree["strategy"].items() if k not in ("xsta", "skd")},
                "seed": tree["seed"]}
    expected = hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]
    assert stages.fingerprint(cfg, stages.PREPARED_KEYS) == expected

    def changes(override: str) -> bool:
        return stages.fingerprint(load_config(SKD, [override]), stages.PREPARED_KEYS) != expected

    assert changes("data.demo_articles=30") and changes("seed=3") and changes("model.tiny.num_hidden_layers=1")
    assert changes("strategy.teachers=[en,es]")
    assert not any(changes(o) for o in ("data.test=[{name: extra, folder: /x, languages: [en]}]",
                                        "strategy.skd.alpha_kl=2.0", "teacher.lr=1e-4", "eval.n_best=5"))


def test_a_store_of_another_run_names_the_redo_that_resets_it(tmp_path):
    plan = ShardPlan(range(8), shard_size=4, seed=0)
    prepare_store(tmp_path, Manifest.for_plan(plan, "tok", {"en": "one"}))
    with pytest.raises(StoreMismatchError, match="teacher 'en' checkpoint.*rerun the same command with --redo store"):
        prepare_store(tmp_path, Manifest.for_plan(plan, "tok", {"en": "two"}))


def test_redo_takes_stage_and_model_names_and_refuses_others_listing_the_valid_ones(tmp_path):
    assert train.parse_args(["--redo", "distill,evaluate"]).redo == {"distill", "evaluate"}
    assert train.parse_args(["--redo", "teacher_en, de"]).redo == {"teacher_en", "de"}
    assert train.parse_args([]).redo == set()
    with pytest.raises(SystemExit):
        train.parse_args(["--redo", ","])
    cfg = load_config(None, [f"run_dir={tmp_path}"])
    assert stages.redo_targets(cfg, {"distill", "teacher_en", "de"}) == ({"distill"}, ["teacher_de", "teacher_en"])
    with pytest.raises(ConfigError) as refused:
        stages.redo_targets(cfg, {"student", "teacher_fr", "teacher_en"})
    assert stages.redo_targets(cfg, {"store", "distill"}) == ({"distill"}, [])
    assert str(refused.value) == ("--redo student, teacher_fr: not a stage or model of this run; choose a stage "
                                  "(teachers, distill, evaluate), store (the run's logit store) or a phase-1 model "
                                  "(teacher_en, teacher_es, "
                                  "teacher_de, or by its directory: teachers/en, teachers/es, teachers/de)")
    baseline = load_config(None, [f"run_dir={tmp_path}", "strategy.name=mixmrc"])
    assert stages.redo_targets(baseline, {"model_mixmrc"}) == (set(), ["model_mixmrc"])
    with pytest.raises(ConfigError, match="model_mixmrc, or by its directory: models/mixmrc"):
        stages.redo_targets(baseline, {"teacher_en"})


@pytest.mark.parametrize("name", ["teacher_es", "es"])
def test_redoing_one_teacher_removes_it_and_every_later_stage_and_keeps_the_other_teachers(tmp_path, name):
    run_dir = tmp_path / "run"
    for path in ("heartbeats/teacher_es.0.json", "heartbeats/teacher_es.1.json", "tb/teacher_es/events.out.1"):
        (run_dir / path).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / path).write_text(path)
    files = fake_run(run_dir)
    cfg = load_config(None, [f"run_dir={run_dir}"])
    stages.check_rerun(cfg, {name})
    kept = {p: h for p, h in files.items() if p.exists()}
    gone = sorted(str(p.relative_to(run_dir)) for p in set(files) - set(kept))
    assert gone == ["checkpoints/student/latest", "checkpoints/teacher_es/latest", "eval/student.json",
                    "heartbeats/student.0.json", "heartbeats/teacher_es.0.json", "heartbeats/teacher_es.1.json",
                    "logits/.lock", "logits/en/heartbeat.json", "logits/en/shard_000000.pt", "logits/manifest.json",
                    "logits/progress.json", "skd/teacher_gen0/config.json", "stages/distill.json",
                    "stages/evaluate.json", "student/DONE.json", "student/model.safetensors",
                    "tb/eval/events.out.tfevents.1", "tb/student/events.out.tfevents.1", "tb/teacher_es/events.out.1",
                    "teachers/es/DONE.json", "teachers/es/model.safetensors", "trace/student.0.jsonl"]
    assert all(hashlib.sha256(p.read_bytes()).hexdigest() == h for p, h in kept.items())
    assert (run_dir / "stages" / "teachers.json").exists(), "the other teachers' settings stay recorded"


def test_redoing_one_teacher_does_not_cover_a_changed_teacher_key(tmp_path):
    run_dir = tmp_path / "run"
    files = fake_run(run_dir)
    with pytest.raises(ConfigError, match=r"teachers: teacher\.lr: (.|\n)*--redo teachers to remove"):
        stages.check_rerun(load_config(None, [f"run_dir={run_dir}", "teacher.lr=1e-4"]), {"teacher_es"})
    assert all(p.exists() for p in files), "a refusal removes nothing"


# --------------------------------------------------------------------------- real runs


@pytest.mark.slow
def test_a_changed_distill_key_is_refused_then_redo_redoes_only_the_student(tmp_path):
    """The entry point on 2 CPU ranks: a tiny run, then the same command with a changed
    distillation key stops on every rank before any training, naming the key; with
    --redo distill only the student (and its evaluation) is redone, reading the teachers'
    logits from the kept store: no teacher forward, no shard file written."""
    from test_pipeline_e2e import QUICK, ROOT, launch, train_command

    from dist_xqa.waiting import read_beat

    run_dir = tmp_path / "run"
    QUICK = (*QUICK, "distill.store_mode=cache")  # the store keeps every shard
    launch(run_dir, *QUICK)
    teachers = {p: p.stat().st_mtime_ns for p in (run_dir / "teachers").rglob("*") if p.is_file()}
    student = (run_dir / "student" / "model.safetensors").stat().st_mtime_ns
    shards = {p: p.stat().st_mtime_ns for p in (run_dir / "logits").glob("*/shard_*")}
    computed = lambda: sum(read_beat(p).detail["rows_computed"]  # noqa: E731
                           for p in (run_dir / "logits").glob("*/heartbeat*.json"))
    assert shards and computed() > 0

    command, env = train_command(run_dir, *QUICK, "distill.lambda_kd=0.7")
    refused = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    output = refused.stdout + refused.stderr
    assert refused.returncode != 0
    assert output.count("distill.lambda_kd: 0.5 -> 0.7") >= 2, "every rank stops with the message"
    assert "--redo distill" in output and "Traceback" not in output
    assert (run_dir / "student" / "model.safetensors").stat().st_mtime_ns == student

    launch(run_dir, *QUICK, "distill.lambda_kd=0.7", "--redo", "distill")
    assert {p: p.stat().st_mtime_ns for p in teachers} == teachers, "the teachers are untouched"
    assert {p: p.stat().st_mtime_ns for p in (run_dir / "logits").glob("*/shard_*")} == shards
    assert computed() == 0, "every teacher row came from the kept store"
    assert (run_dir / "student" / "model.safetensors").stat().st_mtime_ns != student
    record = json.loads((run_dir / "stages" / "distill.json").read_text())
    assert record["settings"]["distill.lambda_kd"] == 0.7
    assert "student" in json.loads((run_dir / "eval" / "summary.json").read_text())
    stages.check_rerun(load_config(None, [f"run_dir={run_dir}", *QUICK, "distill.lambda_kd=0.7"]), set())  # matches now


def finished_source(run_dir: Path, *overrides: str) -> dict[Path, str]:
    """fake_run plus the config.yaml the entry point writes: a run another can borrow from."""
    import yaml

    files = fake_run(run_dir)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(load_config(None, [f"run_dir={run_dir}", *overrides]).to_dict()))
    return files


def test_phase1_from_borrows_the_finished_models_as_they_are_and_records_their_hashes(tmp_path):
    from dist_xqa.jobs import borrowed, phase1_dirs

    source = tmp_path / "first"
    files = finished_source(source)
    cfg = load_config(None, [f"run_dir={tmp_path / 'second'}", f"phase1_from={source}", "distill.lambda_kd=0.7",
                             "student.global_batch_size=48"])
    stages.check_rerun(cfg, set())
    assert phase1_dirs(cfg) == {lang: source / "teachers" / lang for lang in ("en", "es", "de")}
    assert all(borrowed(cfg, d) for d in phase1_dirs(cfg).values())
    assert stages.stage_names(cfg, list(phase1_dirs(cfg))) == ["distill", "evaluate"], "no teachers stage"
    for stage in ("teachers", "distill"):
        stages.record(cfg, stage)
    assert not (tmp_path / "second" / "stages" / "teachers.json").exists()
    weights = json.loads((tmp_path / "second" / "stages" / "distill.json").read_text())["settings"]
    assert weights["weights.es"] == hashlib.sha256(b"model.safetensors\x0064\x00" + bytes([1]) * 64).hexdigest()
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in files} == files, "the source is not written"
    with pytest.raises(ConfigError, match="not a stage or model of this run"):
        stages.redo_targets(cfg, {"teacher_en"})  # another run's model is not this run's to redo


@pytest.mark.parametrize("override,key", [("data.demo_articles=30", "data.demo_articles"),
                                          ("model.max_length=128", "model.max_length"),
                                          ("seed=4", "seed"),  # the demo corpus is drawn from the seed
                                          ("strategy.add_english=false", "strategy.add_english")])
def test_phase1_from_refuses_a_source_of_other_data_or_model_settings_naming_the_key(tmp_path, override, key):
    source = tmp_path / "first"
    finished_source(source)
    cfg = load_config(None, [f"run_dir={tmp_path / 'second'}", f"phase1_from={source}", override])
    with pytest.raises(ConfigError, match=rf"phase1_from {source}: (.|\n)*  {key}: "):
        stages.check_rerun(cfg, set())


def test_phase1_from_refuses_an_unfinished_model_and_a_directory_that_is_no_run(tmp_path):
    source = tmp_path / "first"
    finished_source(source)
    (source / "teachers" / "es" / "DONE.json").unlink()
    cfg = load_config(None, [f"run_dir={tmp_path / 'second'}", f"phase1_from={source}"])
    with pytest.raises(ConfigError, match=r"not finished there .*teachers/es"):
        stages.check_rerun(cfg, set())
    with pytest.raises(ConfigError, match="not a run directory"):
        stages.check_rerun(load_config(None, [f"run_dir={tmp_path / 'second'}", f"phase1_from={tmp_path}"]), set())
    with pytest.raises(ConfigError, match="phase1_from borrows"):
        load_config(None, [f"phase1_from={source}", "strategy.name=mixmrc"])
