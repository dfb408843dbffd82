"""The preparation stage: tokenisation in parallel gives the very features one process
gives; `--stage prepare` runs on one process with no launcher and no torch.distributed;
a `model.name` that is neither a folder nor in the offline cache stops the run at
start-up, before any data work."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dist_xqa.data import features as features_module
from dist_xqa.data.features import TokenizerSettings, build_features
from dist_xqa.data.records import Answer, QAExample
from dist_xqa.data.tokenizer import ensure_tokenizer

CONTEXT = "Anna Kramer worked as a carpenter in Berlin. David Weber worked as an engineer in Hamburg. " * 3


def examples(n: int) -> list[QAExample]:
    return [QAExample(id=f"q{i}", question=f"Who worked in city {i}?", context=f"City{i} {CONTEXT}",
                      answers=(Answer(f"City{i}", 0),), question_lang="en", context_lang="en",
                      article_index=0) for i in range(n)]


def test_parallel_tokenisation_gives_the_features_of_one_process_and_beats_per_chunk(tmp_path, monkeypatch):
    exs = examples(23)
    tok = ensure_tokenizer(tmp_path / "tok", [t for ex in exs for t in (ex.question, ex.context)], vocab_size=300)
    settings = TokenizerSettings.from_tokenizer(tok, "toy", 32, 8)
    monkeypatch.setattr(features_module, "CHUNK_EXAMPLES", 5)  # 5 chunks
    beats = []
    one = build_features(exs, tok, settings)
    four = build_features(exs, tok, settings, num_proc=4, beat=lambda: beats.append(1))
    assert len(beats) == 5, "a beat after every chunk, from the calling process"
    assert len(one) > len(exs), "long contexts: several windows an example"
    assert four.to_dict() == one.to_dict()
    cached = build_features(exs, tok, settings, cache_dir=tmp_path / "cache", num_proc=2)
    assert cached.to_dict() == one.to_dict()
    written = [p.name for p in (tmp_path / "cache").iterdir()]
    assert len(written) == 1 and written[0].startswith("features-") and written[0].endswith(".arrow"), written
    again = build_features(exs, tok, settings, cache_dir=tmp_path / "cache", beat=lambda: beats.append(1))
    assert again.to_dict() == one.to_dict() and len(beats) == 5, "read from the cache, not tokenised again"


PARALLEL_UNDER_STOP_HANDLERS = """
import sys
from pathlib import Path
from dist_xqa.data import features
from dist_xqa.data.features import TokenizerSettings, build_features
from dist_xqa.data.tokenizer import ensure_tokenizer
from dist_xqa.waiting import install_stop_signal
from tests.test_prepare_stage import examples

install_stop_signal()  # as the trainer does before it prepares the data
exs = examples(23)
tok = ensure_tokenizer(Path(sys.argv[1]), [t for ex in exs for t in (ex.question, ex.context)], vocab_size=300)
features.CHUNK_EXAMPLES = 5
for _ in range(3):
    build_features(exs, tok, TokenizerSettings.from_tokenizer(tok, "toy", 32, 8), num_proc=4)
print("done")
"""


def test_parallel_tokenisation_ends_in_a_process_that_handles_stop_signals(tmp_path):
    """The trainer catches SIGTERM to checkpoint; the pool's workers, forked from it, must
    still die of the SIGTERM the pool ends them with (a worker that caught it waited for
    the pool's queue lock forever: the demo hung in its data preparation)."""
    done = subprocess.run([sys.executable, "-c", PARALLEL_UNDER_STOP_HANDLERS, str(tmp_path / "tok")],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "done", done.stderr[-3000:]


# --- start-up: model.name ------------------------------------------------------------------


def test_a_model_name_that_is_no_folder_stops_at_start_up_naming_key_tries_and_hf_home(tmp_path):
    from dist_xqa.train import main

    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        main(["model.name=/nonexistent", f"run_dir={run_dir}"])
    message = str(stop.value)
    assert message.startswith("dist_xqa: configuration error: model.name '/nonexistent' cannot be loaded; tried")
    assert "a local folder /nonexistent (no such folder)" in message and "not a valid Hub name" in message
    assert "HF_HOME=" in message and "Repo id must use" not in message
    assert not run_dir.exists(), "stopped before any data work"


def test_a_hub_name_missing_from_the_offline_cache_stops_naming_the_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from dist_xqa.config import ConfigError
    from dist_xqa.models import check_model_name

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path))
    with pytest.raises(ConfigError, match=rf"model.name 'some-org/absent-model' cannot be loaded; tried a local folder "
                                          rf".*; the Hugging Face cache {tmp_path / 'hub'} \(HF_HOME={tmp_path}\), "
                                          r"offline \(HF_HUB_OFFLINE=1\): not there"):
        check_model_name("some-org/absent-model")
    model = tmp_path / "model"
    model.mkdir()
    with pytest.raises(ConfigError, match="is a folder without config.json"):
        check_model_name(str(model))
    (model / "config.json").write_text("{}")
    check_model_name(str(model))
    check_model_name("tiny")


# --- the other ranks wait on the preparation's heartbeat -----------------------------------

STALL_S = 1.5


def waiting_rank(run_dir: str, launch: str, outcome: str) -> None:
    """Rank 1 of a launch: waits for rank 0's preparation; writes how the wait ended."""
    from dist_xqa.config import load_config
    from dist_xqa.train import _wait_for_preparation

    cfg = load_config(None, [f"run_dir={run_dir}", f"run.stall_timeout_s={STALL_S}"])
    began = time.monotonic()
    Path(f"{outcome}.waiting").touch()
    try:
        _wait_for_preparation(cfg, launch, 1)
        result = {"ok": True}
    except SystemExit as stop:
        result = {"ok": False, "message": str(stop)}
    result["waited"] = time.monotonic() - began
    Path(outcome).write_text(json.dumps(result))


@pytest.mark.parametrize("how", ["finish", "fail", "hang"])
def test_the_other_ranks_wait_on_the_preparations_heartbeat(tmp_path, monkeypatch, how):
    """Rank 0 (this process) prepares for 4 stall timeouts, beating: rank 1 (a real
    process) waits, however long, and goes on when it finishes; a failure reaches it at
    once with rank 0's message; a preparation that stops beating ends the wait after the
    stall timeout, naming it. An earlier launch's finished beat never releases it."""
    import multiprocessing

    from dist_xqa import train
    from dist_xqa.config import ConfigError, load_config
    from dist_xqa.layout import RunLayout
    from dist_xqa.waiting import FINISHED, Heartbeat

    cfg = load_config(None, [f"run_dir={tmp_path}", f"run.stall_timeout_s={STALL_S}"])
    beat_file = RunLayout(tmp_path).heartbeat(train.PREPARE, 0)
    Heartbeat(beat_file, train.PREPARE).beat(99, FINISHED, launch="an earlier launch")
    outcome = tmp_path / "rank1.json"
    waiter = multiprocessing.get_context("spawn").Process(target=waiting_rank, args=(str(tmp_path), "this", str(outcome)))
    waiter.start()

    def slow_preparation(cfg, redo, beat) -> None:
        end = time.monotonic() + 4 * STALL_S
        while time.monotonic() < end:
            beat()
            time.sleep(0.1)
        if how == "fail":
            raise ConfigError("data.train.languages: language 'xx' has no usable examples")

    monkeypatch.setattr(train, "prepare_run", slow_preparation)
    try:
        deadline = time.monotonic() + 120
        while not Path(f"{outcome}.waiting").exists():  # a spawned process imports for seconds
            assert waiter.is_alive() and time.monotonic() < deadline
            time.sleep(0.05)
        if how == "fail":
            with pytest.raises(SystemExit, match="no usable examples"):
                train._prepare_beating(cfg, frozenset(), "this")
        elif how == "finish":
            train._prepare_beating(cfg, frozenset(), "this")
        else:
            Heartbeat(beat_file, train.PREPARE).beat(1, launch="this")  # rank 0 began, then went silent
        waiter.join(60)
        assert waiter.exitcode == 0
    finally:
        if waiter.is_alive():
            waiter.kill()
    result = json.loads(outcome.read_text())
    if how == "finish":
        assert result["ok"], result
        assert result["waited"] > 3 * STALL_S, "a healthy preparation has no wall-clock limit"
    elif how == "fail":
        assert result["ok"] is False and result["message"].startswith(
            "dist_xqa: ConfigError: data.train.languages: language 'xx' has no usable examples (rank 0's data "
            "preparation, log"), result
    else:
        assert result["ok"] is False, result
        assert result["message"].startswith("dist_xqa: rank 1 waiting for rank 0's data preparation: no heartbeat "
                                            "has moved for"), result
        assert "prepare: working at step 1" in result["message"]


QUICK = ["data.demo_articles=6", "model.max_length=96", "model.doc_stride=32"]


def test_the_prepare_stage_runs_on_one_process_without_a_launcher(tmp_path):
    """`python dist_xqa/train.py --stage prepare` (a CPU job before the GPU job): no
    launcher, no process group, parallel tokenisation; started as rank 1 of a launcher's
    world it leaves the work to rank 0."""
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    command = [sys.executable, "dist_xqa/train.py", "--stage", "prepare", *QUICK, "run.num_proc=2"]
    other = subprocess.run([*command, f"run_dir={tmp_path / 'other'}"], cwd=root, capture_output=True, text=True,
                           env={**env, "RANK": "1", "WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "job",
                                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}, timeout=600)
    assert other.returncode == 0, other.stderr[-3000:]
    assert not (tmp_path / "other" / "prepared").exists()
    result = subprocess.run([*command, f"run_dir={tmp_path / 'run'}"], cwd=root, capture_output=True, text=True,
                            env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    assert (run / "prepared" / "prepared.json").exists() and (run / "config.yaml").exists()
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "data", "logs", "prepared"]
    assert "torch.distributed" not in (run / "logs" / "rank0.log").read_text()
