"""DeepSpeed engines on role groups: the config each group's engine gets and real
multi-process worlds (gloo, DeepSpeed on its CPU accelerator) running tests/dist_worker.py
under torchrun. The launcher environment: tests/test_launcher_env.py."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dist_xqa.distributed import load_ds_config, resolve_ds_config

ROOT = Path(__file__).resolve().parents[1]
DS_CONFIGS = sorted((ROOT / "ds_configs").glob("*.json"))
WORKER = ROOT / "tests" / "dist_worker.py"


def resolve(config, group_size=2, on_cuda=False, bf16_supported=False, **kwargs):
    return resolve_ds_config(config, group_size, on_cuda=on_cuda, bf16_supported=bf16_supported,
                             lr=kwargs.pop("lr", 3e-5), weight_decay=kwargs.pop("weight_decay", 0.005), **kwargs)


# --- the config each group's engine gets ------------------------------------------------

def test_the_four_shipped_configs_exist_and_follow_the_paper():
    assert [p.name for p in DS_CONFIGS] == ["zero1.json", "zero2.json", "zero2_offload.json", "zero3.json"]
    for path in DS_CONFIGS:
        config = load_ds_config(path)
        params = config["optimizer"]["params"]
        assert config["optimizer"]["type"] == "AdamW"
        assert (params["eps"], params["weight_decay"]) == (1e-8, 0.005)
        assert config["bf16"]["enabled"] == config["fp16"]["enabled"] == "auto"
        assert config["gradient_clipping"] > 0
    stages = {p.name: load_ds_config(p)["zero_optimization"]["stage"] for p in DS_CONFIGS}
    assert stages == {"zero1.json": 1, "zero2.json": 2, "zero2_offload.json": 2, "zero3.json": 3}
    assert load_ds_config(ROOT / "ds_configs/zero2_offload.json")["zero_optimization"]["offload_optimizer"][
        "device"] == "cpu"


def test_batch_sizes_follow_the_group_size():
    config = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 2, "train_batch_size": 999}
    assert resolve(config, group_size=3)["train_batch_size"] == 8 * 2 * 3
    overridden = resolve(config, group_size=5, micro_batch_size=4, gradient_accumulation_steps=3)
    assert (overridden["train_micro_batch_size_per_gpu"], overridden["gradient_accumulation_steps"],
            overridden["train_batch_size"]) == (4, 3, 60)
    assert resolve({"train_micro_batch_size_per_gpu": 2}, group_size=1)["gradient_accumulation_steps"] == 1
    assert config["train_batch_size"] == 999, "the caller's dict is left alone"


def test_optimizer_takes_the_runs_lr_and_weight_decay_and_keeps_the_rest():
    config = load_ds_config(ROOT / "ds_configs/zero2.json")
    params = resolve(config, lr=2e-5, weight_decay=0.01)["optimizer"]["params"]
    assert (params["lr"], params["weight_decay"], params["eps"], params["betas"]) == (2e-5, 0.01, 1e-8, [0.9, 0.999])
    assert resolve({"train_micro_batch_size_per_gpu": 1})["optimizer"]["type"] == "AdamW"


@pytest.mark.parametrize("path", DS_CONFIGS, ids=lambda p: p.name)
def test_without_cuda_half_precision_is_off_and_adam_is_torchs(path):
    config = resolve(load_ds_config(path), on_cuda=False)
    assert config["bf16"]["enabled"] is False and config["fp16"]["enabled"] is False
    assert config["optimizer"]["params"]["torch_adam"] is True


@pytest.mark.parametrize("bf16_supported,expect", [(True, (True, False)), (False, (False, True))])
def test_on_cuda_auto_picks_bf16_where_supported_else_fp16(bf16_supported, expect):
    config = resolve(load_ds_config(ROOT / "ds_configs/zero2_offload.json"), on_cuda=True,
                     bf16_supported=bf16_supported)
    assert (config["bf16"]["enabled"], config["fp16"]["enabled"]) == expect
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


@pytest.mark.parametrize("path", DS_CONFIGS, ids=lambda p: p.name)
def test_on_cuda_adam_is_torchs_unless_the_config_opts_into_deepspeeds_ops(path):
    """No op is compiled at a GPU job's first step unless the config says "torch_adam": false."""
    config = load_ds_config(path)
    assert resolve(config, on_cuda=True)["optimizer"]["params"]["torch_adam"] is True
    config["optimizer"]["params"]["torch_adam"] = False
    assert resolve(config, on_cuda=True)["optimizer"]["params"]["torch_adam"] is False
    assert resolve(config, on_cuda=False)["optimizer"]["params"]["torch_adam"] is True  # no CUDA: never the ops


def test_explicit_precision_is_kept_on_cuda_and_dropped_without_it():
    config = {"train_micro_batch_size_per_gpu": 1, "fp16": {"enabled": True}, "bf16": {"enabled": "auto"}}
    on_gpu = resolve(config, on_cuda=True, bf16_supported=True)
    assert (on_gpu["bf16"]["enabled"], on_gpu["fp16"]["enabled"]) == (False, True)
    on_cpu = resolve(config, on_cuda=False)
    assert (on_cpu["bf16"]["enabled"], on_cpu["fp16"]["enabled"]) == (False, False)


@pytest.mark.parametrize("config,message", [
    ({}, "train_micro_batch_size_per_gpu must be an integer >= 1, got None"),
    ({"train_micro_batch_size_per_gpu": 0}, "train_micro_batch_size_per_gpu"),
    ({"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": "2"}, "gradient_accumulation_steps"),
    ({"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": "yes"}}, "bf16.enabled must be"),
    ({"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True}, "fp16": {"enabled": True}}, "both enabled"),
    ({"train_micro_batch_size_per_gpu": 1, "gradient_clipping": "auto"}, "found it at gradient_clipping"),
])
def test_bad_configs_are_refused_naming_the_key(config, message):
    with pytest.raises(ValueError) as err:
        resolve(config, on_cuda=True, source="my.json")
    assert "my.json" in str(err.value) and message in str(err.value)


def test_a_config_that_does_not_parse_is_refused_with_file_and_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{\n  "train_micro_batch_size_per_gpu": 4,\n  "fp16": {"enabled": tru}\n}\n')
    with pytest.raises(ValueError, match=r"broken.json, line 3 column"):
        load_ds_config(path)
    with pytest.raises(ValueError, match="cannot read it"):
        load_ds_config(tmp_path / "missing.json")
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(ValueError, match="top level must be a JSON object"):
        load_ds_config(tmp_path / "list.json")


# --- real worlds --------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_world(nproc: int, out: Path, *worker_args: str, launcher: str = "torchrun", timeout: float = 900,
              worker: Path = WORKER) -> None:
    """`worker` (tests/dist_worker.py) on `nproc` ranks under torchrun or the deepspeed launcher,
    DeepSpeed on its CPU accelerator (the venv's bin first on PATH for its ninja)."""
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    if launcher == "torchrun":
        start = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    else:
        port = free_port()
        start = [str(bin_dir / "deepspeed"), f"--num_gpus={nproc}", f"--master_port={port}"]
    command = [*start, str(worker), "--out", str(out), *worker_args]
    result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"world of {nproc} failed:\n{(result.stdout + result.stderr)[-6000:]}"
    if launcher == "deepspeed":  # its CPU shared-memory segments are named by the port
        assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*")), "leaked /dev/shm segments"


def load(out: Path, group: str, rank: int) -> dict:
    return torch.load(out / f"{group.replace('/', '_')}-rank{rank}.pt")


def assert_trained_and_in_sync(out: Path, group: str, ranks: list[int], micro_batch: int = 4) -> torch.Tensor:
    """Every rank of the group ends with the same weights, changed by training, from an
    engine whose data-parallel world is exactly the group; returns those weights."""
    records = [load(out, group, r) for r in ranks]
    for record in records:
        assert record["group_ranks"] == ranks
        assert record["dp_world_size"] == len(ranks)
        assert record["train_batch_size"] == micro_batch * len(ranks)
        assert all(torch.isfinite(torch.tensor(record["losses"])))
        assert not torch.equal(record["before"], record["after"]), f"{group} did not train"
        torch.testing.assert_close(record["after"], records[0]["after"], rtol=0, atol=0)
    return records[0]["after"]


def test_two_ranks_teachers_then_student_with_no_world_collective(tmp_path):
    """Two single-rank teacher groups (ZeRO-3), one after the other: rank 1 starts its
    teacher only once rank 0 has built, trained, checkpointed and released its engine,
    so any world-wide collective inside DeepSpeed would stall rank 0 and fail the run.
    Each group's checkpoint resumes into a fresh engine. Then both ranks build one
    student engine over the two of them."""
    run_world(2, tmp_path, "--ds-config", str(ROOT / "ds_configs/zero3.json"), "--teachers", "en,es",
              "--student-min-ranks", "2", "--one-group-at-a-time", "--reload", "--timeout", "600")
    ranks = {"teacher/en": [0], "teacher/es": [1], "student": [0, 1]}
    weights = {group: assert_trained_and_in_sync(tmp_path, group, members) for group, members in ranks.items()}
    assert not torch.allclose(weights["teacher/en"], weights["teacher/es"]), "different data, different teachers"
    for group, members in ranks.items():
        # found through its `latest` tag, also in the group without world rank 0
        assert (tmp_path / "ckpt" / group / "latest").read_text() == "final"
        for rank in members:
            record = load(tmp_path, group, rank)
            torch.testing.assert_close(record["reloaded"], record["after"], rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("config", DS_CONFIGS, ids=lambda p: p.stem)
def test_four_ranks_two_concurrent_teacher_groups_then_one_student(tmp_path, config):
    """Two teacher groups of two ranks train concurrently on different data: the groups
    end with different weights, the ranks of a group with identical ones (each rank saw
    different batches, so the group's data-parallel reduction did that). Then the same
    four ranks release their engines and train one student engine together."""
    run_world(4, tmp_path, "--ds-config", str(config), "--teachers", "en,es", "--student-min-ranks", "4")
    en = assert_trained_and_in_sync(tmp_path, "teacher/en", [0, 1])
    es = assert_trained_and_in_sync(tmp_path, "teacher/es", [2, 3])
    assert not torch.allclose(en, es)
    assert_trained_and_in_sync(tmp_path, "student", [0, 1, 2, 3])


@pytest.mark.slow
def test_deepspeed_launcher_world_keeps_groups_independent(tmp_path):
    """The users' launcher: it passes --local_rank and sets LOCAL_SIZE, which makes
    DeepSpeed's CPU communication op wait at its first use until every rank of the node
    has started it; init_distributed does that at start-up, so rank 0 can train its
    teacher alone while rank 1 waits."""
    run_world(2, tmp_path, "--ds-config", str(ROOT / "ds_configs/zero2.json"), "--teachers", "en,es",
              "--student-min-ranks", "2", "--one-group-at-a-time", "--timeout", "600", launcher="deepspeed")
    en = assert_trained_and_in_sync(tmp_path, "teacher/en", [0])
    es = assert_trained_and_in_sync(tmp_path, "teacher/es", [1])
    assert not torch.allclose(en, es)
    assert_trained_and_in_sync(tmp_path, "student", [0, 1])


def tags_on_disk(ckpt_dir: Path) -> list[str]:
    return sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir())


def test_group_loop_keeps_the_newest_checkpoints_and_resumes_from_them(tmp_path):
    """A two-rank ZeRO-2 group (each rank writes its optimizer partition into every tag)
    checkpoints every 2 steps and at epoch ends, keeping 2: older tags are removed by the
    group's first rank and logged; a rerun with one more epoch resumes from the newest."""
    loop_worker = ROOT / "tests" / "loop_worker.py"
    run_world(2, tmp_path, "--epochs", "2", worker=loop_worker, timeout=600)
    first = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # 3 steps an epoch: saves at global steps 2, 3 (epoch end), 4 and 6 (epoch end)
    assert [step for step, _ in first[0]["saves"]] == [2, 3, 4, 6]
    assert [tags for _, tags in first[0]["saves"]] == [["step2"], ["step2", "step3"], ["step3", "step4"],
                                                       ["step4", "step6"]]
    assert first[0]["resumed_from"] is None and first[0]["final"]["global_step"] == 6
    assert tags_on_disk(tmp_path / "ckpt") == ["step4", "step6"]
    assert (tmp_path / "ckpt" / "latest").read_text() == "step6"
    assert len(list((tmp_path / "ckpt" / "step6").glob("*optim_states.pt"))) == 2, "both ranks' partitions kept"
    log0 = (tmp_path / "rank0.log").read_text()
    assert "student: removed checkpoint(s) step2 (checkpoint.keep = 2)" in log0
    assert "student: removed checkpoint(s) step3 (checkpoint.keep = 2)" in log0
    assert "removed checkpoint" not in (tmp_path / "rank1.log").read_text(), "only the group's first rank deletes"
    beat = json.loads((tmp_path / "heartbeats" / "student.1.json").read_text())
    assert (beat["role"], beat["state"], beat["step"]) == ("student", "finished", 6)

    # A tag of a later step, left by a run that went further than `latest` says, is never
    # resumed from: the first save removes it (and never the tag it just wrote).
    (tmp_path / "ckpt" / "step99").mkdir()
    run_world(2, tmp_path, "--epochs", "3", worker=loop_worker, timeout=600)
    second = json.loads((tmp_path / "rank0.json").read_text())
    assert second["resumed_from"] == "step6" and second["final"]["global_step"] == 9
    assert tags_on_disk(tmp_path / "ckpt") == ["step8", "step9"]
    assert "student: removed checkpoint(s) step4, step99 (checkpoint.keep = 2)" in (tmp_path / "rank0.log").read_text()


def signal_loop_worker(tmp_path: Path, args: list[str], ready, signum: int) -> tuple[int, str, Path]:
    """Runs tests/loop_worker.py on 2 ranks under torchrun, sends `signum` to rank 1 once its
    heartbeat satisfies `ready(beat)`, and returns (exit status, output, heartbeat file)."""
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(ROOT / "tests" / "loop_worker.py"), "--out", str(tmp_path), *args]
    job = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    beat = tmp_path / "heartbeats" / "student.1.json"
    try:
        deadline = time.monotonic() + 300
        while not beat.exists() or not ready(json.loads(beat.read_text())):
            assert job.poll() is None and time.monotonic() < deadline, job.stdout.read()[-4000:]
            time.sleep(0.05)
        os.kill(json.loads(beat.read_text())["pid"], signum)
        output = job.communicate(timeout=300)[0]
    finally:
        job.kill()
    return job.returncode, output, beat


def test_sigusr1_checkpoints_the_group_at_one_step_and_a_rerun_resumes_there(tmp_path):
    """Slurm's USR1 before the time limit reaches each rank at its own moment (here only
    rank 1 gets it): the group agrees on one step, checkpoints it outside the schedule,
    exits 0 with the heartbeat saying `stopped`; the same command then finishes."""
    loop_worker = ROOT / "tests" / "loop_worker.py"
    args = ["--epochs", "1", "--steps", "200", "--every", "1000", "--step-sleep", "0.05"]
    returncode, output, beat = signal_loop_worker(tmp_path, args, lambda b: b["step"] >= 5, signal.SIGUSR1)
    assert returncode == 0, output[-4000:]
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all("stopped by a signal at global step" in r["preempted"] for r in records)
    assert records[0]["preempted"] == records[1]["preempted"], "both ranks stop at the same step"
    stopped_at = records[0]["saves"][-1][0]
    assert 5 <= stopped_at < 200 and tags_on_disk(tmp_path / "ckpt") == [f"step{stopped_at}"]
    assert json.loads(beat.read_text())["state"] == "stopped"

    run_world(2, tmp_path, *args[:-2], worker=loop_worker, timeout=600)
    resumed = json.loads((tmp_path / "rank0.json").read_text())
    assert resumed["resumed_from"] == f"step{stopped_at}" and resumed["final"]["global_step"] == 200
