"""The learning-rate schedule every role trains with: linear warmup over
`warmup_ratio` of the optimizer steps, then linear decay to 0 at the last step, run by
DeepSpeed's own scheduler inside a real engine (a world of one rank, in a subprocess so
that its process group does not outlive the test)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dist_xqa.distributed import resolve_ds_config

ROOT = Path(__file__).resolve().parents[1]

ENGINE_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from transformers import BertConfig, BertForQuestionAnswering
    from dist_xqa.distributed import build_engine, init_distributed, make_groups, release_engine
    from dist_xqa.plan import plan_roles

    lr, total, ratio = float(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    init_distributed()
    plan = plan_roles(1, ["en"])
    group = make_groups(plan)[plan.student.name]
    torch.manual_seed(0)
    model = BertForQuestionAnswering(BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1,
                                                num_attention_heads=2, intermediate_size=32,
                                                max_position_embeddings=8))
    engine = build_engine(model, "ds_configs/zero2.json", group, lr=lr, weight_decay=0.0, micro_batch_size=2,
                          gradient_accumulation_steps=1, total_steps=total, warmup_ratio=ratio)
    lrs = [engine.get_lr()[0]]  # the lr the next optimizer step uses
    for _ in range(total):
        out = engine(input_ids=torch.randint(1, 30, (2, 8)), start_positions=torch.tensor([1, 2]),
                     end_positions=torch.tensor([2, 3]))
        engine.backward(out.loss)
        engine.step()
        lrs.append(engine.get_lr()[0])
    release_engine(engine)
    print("LRS " + json.dumps(lrs))
""")


def engine_lrs(lr: float, total: int, ratio: float) -> list[float]:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-c", ENGINE_SCRIPT, str(lr), str(total), str(ratio)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("LRS "))
    return json.loads(line[4:])


def test_engine_warms_up_to_the_configured_lr_then_decays_to_zero_at_the_last_step():
    lr, total, ratio = 1e-3, 20, 0.2  # 4 warmup iterations
    lrs = engine_lrs(lr, total, ratio)  # lrs[k]: the lr after k optimizer steps
    assert len(lrs) == total + 1
    assert lrs[0] == lrs[1] == 0.0  # linear warmup from 0 (DeepSpeed's iteration 0 is after the first step)
    assert lrs[1:6] == pytest.approx([lr * i / 4 for i in range(0, 5)])  # linear up to lr
    assert lrs[5] == pytest.approx(lr) and max(lrs) == pytest.approx(lr)
    decay = lrs[5:]  # then linear decay to exactly 0 after the last step
    assert [a - b for a, b in zip(decay, decay[1:])] == pytest.approx([lr / (total - 5)] * (total - 5))
    assert lrs[-1] == 0.0 and lrs[-2] > 0


def test_resolved_config_holds_the_schedule_and_replaces_a_json_scheduler():
    config = {"train_micro_batch_size_per_gpu": 2, "scheduler": {"type": "OneCycle", "params": {}}}
    resolved = resolve_ds_config(config, 2, on_cuda=False, bf16_supported=False, lr=3e-5, weight_decay=0.0,
                                 total_steps=1000, warmup_ratio=0.1)
    assert resolved["scheduler"] == {"type": "WarmupDecayLR", "params": {
        "total_num_steps": 999, "warmup_min_lr": 0.0, "warmup_max_lr": 3e-5, "warmup_num_steps": 100,
        "warmup_type": "linear"}}
    without = resolve_ds_config({"train_micro_batch_size_per_gpu": 2}, 2, on_cuda=False, bf16_supported=False,
                                lr=3e-5, weight_decay=0.0)
    assert "scheduler" not in without
