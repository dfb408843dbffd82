"""Two nodes, one file system (DESIGN.md section 2, "GPU clusters"), on this machine: two
torchrun agents, one "node" each (`--nnodes 2 --nproc_per_node 1`, c10d rendezvous on
loopback), run the small demo into one run directory, each with its own node-local build
caches. The second node's rank is 1 and its local rank 0, so anything keyed by the local
rank would be written by both ranks, each thinking it is rank 0 of its node: every file
of the run must be keyed by global rank or by rank within a role group."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from test_pipeline_e2e import BIN, LANGUAGES, ROOT, cpu_env, free_port

QUICK = ["data.demo_articles=6", "model.max_length=96", "model.doc_stride=32", "teacher.epochs=1", "student.epochs=1"]


@pytest.mark.slow
def test_the_demo_runs_as_two_nodes_sharing_one_run_directory(tmp_path):
    run_dir = tmp_path / "run"
    port = free_port()
    built = Path.home() / ".cache" / "torch_extensions"
    agents, outputs = [], []
    for node in (0, 1):
        local = tmp_path / f"node{node}"
        local.mkdir()
        extensions = local / "torch_extensions"
        if built.is_dir():  # a node's cache filled ahead, as set-up does: no compile in the test
            shutil.copytree(built, extensions)
        env = {**cpu_env(), "TORCH_EXTENSIONS_DIR": str(extensions), "TRITON_CACHE_DIR": str(local / "triton")}
        command = [str(BIN / "torchrun"), "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(node),
                   "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "two-nodes",
                   "--max_restarts", "0", "dist_xqa/train.py", "--deepspeed", "ds_configs/zero2.json",
                   f"run_dir={run_dir}", *QUICK]
        outputs.append((local / "agent.log").open("w"))
        agents.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=outputs[-1], stderr=subprocess.STDOUT))
    try:
        codes = [agent.wait(timeout=1500) for agent in agents]
    finally:
        for agent in agents:
            agent.kill()
        for output in outputs:
            output.close()
    logs = "\n".join((tmp_path / f"node{n}" / "agent.log").read_text()[-3000:] for n in (0, 1))
    assert codes == [0, 0], logs

    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    assert sorted(summary) == ["student", *(f"teacher_{lang}" for lang in sorted(LANGUAGES))], "every model scored"
    # One log per global rank, each written by that rank alone.
    assert sorted(p.name for p in (run_dir / "logs").iterdir()) == ["rank0.log", "rank1.log"]
    for rank in (0, 1):
        tags = set(re.findall(r"\[rank (\d+)\]", (run_dir / "logs" / f"rank{rank}.log").read_text()))
        assert tags == {str(rank)}, f"logs/rank{rank}.log holds lines of ranks {tags}"
    # Heartbeats per rank of a role group: the student group spans both nodes, and its two
    # ranks beat two files from two processes.
    beats = {p.name: json.loads(p.read_text()) for p in (run_dir / "heartbeats").iterdir()}
    assert {"student.0.json", "student.1.json"} <= set(beats), sorted(beats)
    assert beats["student.0.json"]["pid"] != beats["student.1.json"]["pid"]
    teacher_beats = [name for name in beats if name.startswith("teacher_")]
    assert {name.split(".")[0] for name in teacher_beats} == {f"teacher_{lang}" for lang in LANGUAGES}
    assert {beat["pid"] for name, beat in beats.items() if name.startswith("teacher_")} == {
        beats["student.0.json"]["pid"], beats["student.1.json"]["pid"]}, "the teachers ran on both nodes"
