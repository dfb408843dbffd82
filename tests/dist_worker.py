"""One rank of the multi-process tests in tests/test_group_engines.py, launched by torchrun
or the deepspeed launcher.

Runs the role plan's life on real DeepSpeed engines (gloo, tiny BertForQuestionAnswering):
phase 1, every teacher group of this rank trains on its own data (groups concurrently,
or with --one-group-at-a-time each group starts only after the groups before it in the
plan are done: then a world-wide collective inside DeepSpeed could only hang, which
proves there is none); each group saves a DeepSpeed checkpoint (with --reload a fresh engine then resumes from
it). Phase 2, the same ranks
release their engines and build the student engine and train it. For every engine the
rank saves `<out>/<group>-rank<r>.pt`: the gathered weights before and after training
(and after reloading), the engine's data-parallel size and batch size, for the test.
"""
from __future__ import annotations

import argparse
import time
import zlib
from datetime import timedelta
from pathlib import Path

import deepspeed
import torch
from transformers import BertConfig, BertForQuestionAnswering

from dist_xqa.distributed import (TrainingGroup, build_engine, init_distributed, load_ds_config, make_groups,
                                  release_engine)
from dist_xqa.plan import RoleGroup, plan_roles

SEQ_LEN = 16
MICRO_BATCH = 4


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank: groups differ by their data only
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=SEQ_LEN)
    return BertForQuestionAnswering(config)


def batch(name: str, group_rank: int, step: int) -> dict[str, torch.Tensor]:
    """Data that differs per group (by name), per rank inside a group and per step."""
    generator = torch.Generator().manual_seed(zlib.crc32(f"{name}/{group_rank}/{step}".encode()))
    starts = torch.randint(1, SEQ_LEN - 3, (MICRO_BATCH,), generator=generator)
    return {"input_ids": torch.randint(1, 50, (MICRO_BATCH, SEQ_LEN), generator=generator),
            "start_positions": starts, "end_positions": starts + 2}


def gathered_weights(engine) -> torch.Tensor:
    """All parameters flattened; under ZeRO-3 gathered from the group's partitions first."""
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params):
        return torch.cat([p.detach().float().flatten().clone() for p in params])


def wait_for(paths: list[Path], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        if time.monotonic() > deadline:
            missing = [str(p) for p in paths if not p.exists()]
            raise TimeoutError(f"groups before this one never finished (missing {missing}): a rank "
                               "of theirs is probably stuck in a world-wide collective")
        time.sleep(0.2)


def new_engine(group: TrainingGroup, ds_config: dict):
    return build_engine(tiny_model(), ds_config, group, lr=1e-3, weight_decay=0.005, micro_batch_size=MICRO_BATCH)


def train(group: TrainingGroup, ds_config: dict, steps: int, out: Path, rank: int, reload: bool) -> None:
    engine = new_engine(group, ds_config)
    before = gathered_weights(engine)
    losses = []
    for step in range(steps):
        loss = engine(**batch(group.name, group.rank, step)).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    ckpt_dir = str(out / "ckpt" / group.name)
    engine.save_checkpoint(ckpt_dir, tag="final")
    record = {"before": before, "after": gathered_weights(engine), "losses": losses, "group_ranks": list(group.ranks),
              "dp_world_size": engine.dp_world_size, "train_batch_size": engine.train_batch_size()}
    release_engine(engine)
    if reload:  # a fresh engine resumes from the group's checkpoint through its `latest` tag
        engine = new_engine(group, ds_config)
        engine.load_checkpoint(ckpt_dir)
        record["reloaded"] = gathered_weights(engine)
        release_engine(engine)
    torch.save(record, out / f"{group.name.replace('/', '_')}-rank{rank}.pt")


def done_marker(out: Path, group: RoleGroup) -> Path:
    return out / f"done_{group.name.replace('/', '_')}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ds-config", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--teachers", default="en,es")
    parser.add_argument("--student-min-ranks", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--one-group-at-a-time", action="store_true")
    parser.add_argument("--reload", action="store_true", help="resume each group from its checkpoint")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--local_rank", type=int, help="passed by the deepspeed launcher (also in LOCAL_RANK)")
    args = parser.parse_args()

    ctx = init_distributed(timeout=timedelta(seconds=args.timeout))
    plan = plan_roles(ctx.world_size, args.teachers.split(","), student_min_ranks=args.student_min_ranks)
    groups = make_groups(plan)
    ds_config = load_ds_config(args.ds_config)
    # tiny models sit below ZeRO-3's persistence threshold; partition every parameter
    ds_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0

    teacher_groups = [g for round_ in plan.teacher_rounds for g in round_]
    for role_group in plan.teacher_groups_for(ctx.rank):
        if args.one_group_at_a_time:
            earlier = teacher_groups[:teacher_groups.index(role_group)]
            wait_for([done_marker(args.out, g) for g in earlier], args.timeout)
        train(groups[role_group.name], ds_config, args.steps, args.out, ctx.rank, args.reload)
        if groups[role_group.name].rank == 0:
            done_marker(args.out, role_group).touch()
    if ctx.rank in plan.student.ranks:
        train(groups[plan.student.name], ds_config, args.steps, args.out, ctx.rank, args.reload)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
