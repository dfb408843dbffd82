"""Top-k compressed logit store (`distill.store_topk`): bytes per row, and what the
compression changes in the student's KD loss and in the imp teacher weights against the
dense float16 store, for k in {8, 16, 32, 64}.

Each variant goes through the real store path: the K teachers' start and end logits are
compressed (dist_xqa.logits.shards.compress_topk, as the Producer does), written as shard
files (write_shard), read back and verified (read_shard) and reconstructed
(dense_logits, as the student does); the dense baseline is written and read the same way.
The KD loss is dist_xqa.losses.entropy_weighted_kd (the reference; the fused kernel computes
the same function of the same reconstructed logits) at tau = 2 with the imp (sign -1) and
hyper aggregations, on one student's logits.

Teacher logits are synthetic, shaped like an extractive-QA head's, in two regimes:
- trained: a low background (-4 +- 2) shared by the teachers (same text), a few plausible
  candidates (~4 % of the context, +4), one answer (+10, or CLS in 15 % of the windows), each
  teacher with its own noise (+-1) and per-row sharpness (x 0.7-1.3), and in 20 % of the rows
  a teacher that puts its answer on a candidate instead (disagreement);
- weak: flat logits (+-1.5 around a shared +-1 structure, the answer only +2): an early or
  tiny teacher, the worst case for top-k.
Question tokens carry large logits (a QA head's output there is arbitrary): they are outside
the positions mask and must take neither a slot nor mass. The student is the teachers'
average plus noise (+-1.5), a student part-way through distillation. Contexts: CLS, a
question of 8-31 tokens, a context to the end of the window (30 %) or shorter, padding.

`--store NAME=RUN_DIR` adds a regime of real logits: the dense cache-mode store a finished
run left in RUN_DIR/logits (its first shards, up to `--store-features` rows per teacher),
with the answer-position masks of its prepared features and, as the student, the run's
trained student's logits on the same rows. The student's F1 with a top-k store is measured
by training: `benchmarks/quality.py --rows topk` (RESULTS.md).

Run:   python benchmarks/topk.py [--features 2048] [--seq-len 384] [--store demo=runs/.../lbmrc_imp]
Writes benchmarks/results/topk.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from dist_xqa import losses  # noqa: E402
from dist_xqa.inference import label_tensors, predict_logits  # noqa: E402
from dist_xqa.logits.manifest import read_manifest  # noqa: E402
from dist_xqa.logits.shards import compress_topk, dense_logits, list_shards, read_shard, write_shard  # noqa: E402
from dist_xqa.models import load_trained  # noqa: E402
from dist_xqa.jobs import DISTILL_SET  # noqa: E402
from dist_xqa.layout import RunLayout  # noqa: E402
from dist_xqa.prepared import Prepared  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "topk.json"
KS = (8, 16, 32, 64)
TAU = 2.0
# SQuAD v1.1 train examples; features per example at L = 384, stride 128 (Hugging Face run_qa).
SQUAD_EXAMPLES, FEATURES_PER_EXAMPLE = 87_599, 1.03


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--features", type=int, default=2048, help="rows (features) per teacher")
    parser.add_argument("--seq-len", type=int, default=384, help="L")
    parser.add_argument("--teachers", type=int, default=3, help="K")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--store", action="append", default=[], metavar="NAME=RUN_DIR",
                        help="a regime of real logits: the dense logit store of a finished cache-mode run")
    parser.add_argument("--store-features", type=int, default=1024,
                        help="rows per teacher read from each --store (the student's forward over them is the cost)")
    args = parser.parse_args(argv)
    stores = {}
    for spec in args.store:
        name, sep, run_dir = spec.partition("=")
        if not sep or not name or not run_dir:
            parser.error(f"--store wants NAME=RUN_DIR, got {spec!r}")
        stores[name] = Path(run_dir)
    args.store = stores
    return args


def positions_mask(features: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """CLS + context (after the question and a separator), then padding: bool [S, L]."""
    mask = torch.zeros(features, length, dtype=torch.bool)
    for row in range(features):
        start = int(torch.randint(8, 32, (), generator=gen)) + 2
        full = torch.rand((), generator=gen) < 0.3
        end = length - 1 if full else int(torch.randint(min(start + 40, length - 1), length, (), generator=gen))
        mask[row, 0] = True
        mask[row, start:end] = True
    return mask


def teacher_logits(mask: torch.Tensor, teachers: int, regime: str, gen: torch.Generator) -> torch.Tensor:
    """[K, S, L] float32 logits of one part (start or end) in `regime` (module docstring)."""
    features, length = mask.shape
    context = mask.clone()
    context[:, 0] = False

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    def pick(weights: torch.Tensor) -> torch.Tensor:  # one position per row
        return torch.multinomial(weights.float() + 1e-12, 1, generator=gen).squeeze(-1)

    rows = torch.arange(features)
    if regime == "trained":
        shared = -4 + 2 * randn(features, length)
        candidates = context & (torch.rand(features, length, generator=gen) < 0.04)
        shared = shared + 4 * candidates
        answer = pick(context)
        answer = torch.where(torch.rand(features, generator=gen) < 0.15, 0, answer)  # answer not in this window
        out = []
        for _ in range(teachers):
            x = shared + randn(features, length)
            disagree = (torch.rand(features, generator=gen) < 0.2) & candidates.any(-1)
            # (rows without candidates never disagree; they only keep multinomial's input valid)
            own = torch.where(disagree, pick(candidates | ~candidates.any(-1, keepdim=True)), answer)
            x[rows, own] += 10 + 1.5 * randn(features)
            out.append(x * (0.7 + 0.6 * torch.rand(features, 1, generator=gen)))
    elif regime == "weak":
        shared = randn(features, length)
        answer = pick(context)
        out = []
        for _ in range(teachers):
            x = shared + 1.5 * randn(features, length)
            x[rows, answer] += 2
            out.append(x)
    else:
        raise ValueError(f"unknown regime {regime!r}")
    positions = torch.arange(length)
    question = (positions >= 1) & (positions < context.float().argmax(-1, keepdim=True))
    return torch.stack(out).masked_fill(question, 15.0)


def store_regime(run_dir: Path, features: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """Real logits from the dense store of a finished run: (mask [S, L], start and end
    [K, S, L] float32, the run's trained student's logits [2S, L] (start rows, then end rows),
    a description). Reads the store's shards in index order, the same rows for every teacher."""
    store = RunLayout(run_dir).store
    manifest = read_manifest(store)
    if manifest is None:
        raise SystemExit(f"topk: {store} holds no logit store (no manifest.json): pass the run directory of a finished run")
    if manifest.topk is not None:
        raise SystemExit(f"topk: {store} is a top-{manifest.topk} store; the comparison needs a dense one")
    teachers = sorted(manifest.teachers)
    shards = {t: list_shards(store / t) for t in teachers}
    common = sorted(set.intersection(*(set(found) for found in shards.values())))
    ids, start, end = [], {t: [] for t in teachers}, {t: [] for t in teachers}
    for index in common:
        if len(ids) >= features:
            break
        data = {t: read_shard(shards[t][index], dtype=manifest.torch_dtype, topk=None) for t in teachers}
        shard_ids = data[teachers[0]].feature_ids.tolist()
        if any(d.feature_ids.tolist() != shard_ids for d in data.values()):
            raise SystemExit(f"topk: shard {index} of {store} holds different feature ids for different teachers")
        ids += shard_ids
        for t in teachers:
            start[t].append(data[t].start.float())
            end[t].append(data[t].end.float())
    if not ids:
        raise SystemExit(f"topk: {store} has no shard that every teacher ({', '.join(teachers)}) wrote")
    ids = ids[:features]
    prepared = Prepared(run_dir)
    distill = prepared.features(DISTILL_SET)
    row_of = {int(f): row for row, f in enumerate(distill["feature_id"])}
    rows = [row_of[f] for f in ids]
    mask = label_tensors(distill, rows, torch.device("cpu"))[0]
    s_start, s_end = predict_logits(load_trained(RunLayout(run_dir).student), distill, 32, torch.device("cpu"), rows,
                                    desc=f"student logits ({run_dir.name})")
    student = torch.cat([torch.as_tensor(s_start), torch.as_tensor(s_end)]).float()
    def stack(parts: dict) -> torch.Tensor:  # [K, S, L]
        return torch.stack([torch.cat(parts[t])[: len(ids)] for t in teachers])

    info = dict(run_dir=str(run_dir), teachers=teachers, features=len(ids), seq_len=mask.shape[1],
                valid_positions_mean=mask.sum(-1).float().mean().item())
    return mask, stack(start), stack(end), student, info


def synthetic_regimes(args, gen: torch.Generator) -> dict:
    """The two synthetic regimes (module docstring), on one set of masks."""
    mask = positions_mask(args.features, args.seq_len, gen)
    regimes = {}
    for regime in ("trained", "weak"):
        start, end = (teacher_logits(mask, args.teachers, regime, gen) for _ in range(2))
        teachers_full = torch.cat([start, end], 1)
        student = teachers_full.mean(0) + 1.5 * torch.randn(teachers_full.shape[1:], generator=gen)
        regimes[regime] = (mask, start, end, student, dict(synthetic=regime))
    return regimes


def through_store(directory: Path, start: torch.Tensor, end: torch.Tensor, mask: torch.Tensor,
                  k: int | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Writes each teacher's shard (dense, or top-k) and reads it back as the student does:
    (start, end) [K, S, L] float32 as the losses see them, and the files' total bytes."""
    features = mask.shape[0]
    ids = list(range(features))
    parts, size = ([], []), 0
    for teacher in range(start.shape[0]):
        s, e = start[teacher], end[teacher]
        if k is not None:
            s, e = compress_topk(s, mask, k), compress_topk(e, mask, k)
        path = directory / f"{'dense' if k is None else f'top{k}'}_{teacher}.safetensors"
        size += write_shard(path, ids, s, e)
        data = read_shard(path, ids, torch.float16, topk=k)
        parts[0].append(dense_logits(data.start, mask))
        parts[1].append(dense_logits(data.end, mask))
    return torch.stack(parts[0]), torch.stack(parts[1]), size


def kd(student: torch.Tensor, teachers: torch.Tensor, mask: torch.Tensor, mode: str) -> dict:
    """The student's KD term: loss, teacher weights [R, K], row losses [R], d loss / d student,
    and the target softmax(z / tau) of the aggregated teachers [R, L]."""
    student = student.clone().requires_grad_(True)
    loss, weights, rows = losses.entropy_weighted_kd(student, teachers, mask, TAU, mode, None, -1.0, True)
    (grad,) = torch.autograd.grad(loss, student)
    target = losses.masked_log_softmax(losses.aggregate_teachers(teachers, weights), mask, TAU).exp()
    return dict(loss=loss.item(), weights=weights, rows=rows, grad=grad, target=target)


def deviations(dense: dict, topk: dict, row_valid: torch.Tensor) -> dict:
    """How far the top-k store's KD term is from the dense store's, per aggregation mode.
    The loss includes the target's entropy (a constant for the student), so the target's
    total variation distance and the gradient are the figures that matter for training."""
    out = {}
    for mode in dense:
        d, t = dense[mode], topk[mode]
        row_dev = ((t["rows"] - d["rows"]).abs() / d["rows"].abs().clamp(min=1e-12))[row_valid]
        out[mode] = dict(
            kd_loss_rel_dev=abs(t["loss"] - d["loss"]) / abs(d["loss"]),
            kd_row_rel_dev_median=row_dev.median().item(),
            kd_row_rel_dev_p99=row_dev.quantile(0.99).item(),
            kd_grad_rel_l1=((t["grad"] - d["grad"]).abs().sum() / d["grad"].abs().sum()).item(),
            target_tv_mean=(0.5 * (t["target"] - d["target"]).abs().sum(-1))[row_valid].mean().item(),
        )
        if mode == "imp":
            dw = (t["weights"] - d["weights"]).abs()[row_valid]
            out[mode].update(weight_abs_dev_mean=dw.mean().item(), weight_abs_dev_max=dw.max().item())
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    gen = torch.Generator().manual_seed(args.seed)
    regimes = synthetic_regimes(args, gen)
    for name, run_dir in args.store.items():
        regimes[f"store:{name}"] = store_regime(run_dir, args.store_features)
    report = dict(
        benchmark="topk",
        machine=f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})",
        torch=torch.__version__,
        config=dict(features=args.features, seq_len=args.seq_len, teachers=args.teachers, tau=TAU, imp_sign=-1.0,
                    logits_dtype="float16", seed=args.seed, ks=list(KS),
                    valid_positions_mean=regimes["trained"][0].sum(-1).float().mean().item()),
        regimes={},
    )
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        for regime, (mask, start, end, student, info) in regimes.items():
            k_teachers, features, length = start.shape
            rows_mask = torch.cat([mask, mask])  # start rows, then end rows, as student_loss stacks them
            row_valid = rows_mask.any(-1)
            d_start, d_end, dense_bytes = through_store(directory, start, end, mask, None)
            dense_teachers = torch.cat([d_start, d_end], 1)
            dense = {mode: kd(student, dense_teachers, rows_mask, mode) for mode in ("imp", "hyper")}
            dense_entropy = losses.masked_entropy(dense_teachers, rows_mask)
            probs = {tau: losses.masked_log_softmax(dense_teachers, rows_mask, tau).exp() for tau in (1.0, TAU)}
            result = dict(source=info, dense=dict(bytes_per_feature=dense_bytes / (k_teachers * features),
                                                  kd_loss={mode: dense[mode]["loss"] for mode in dense},
                                                  teacher_entropy_mean=dense_entropy.mean().item()), k={})
            for k in KS:
                t_start, t_end, size = through_store(directory, start, end, mask, k)
                top_teachers = torch.cat([t_start, t_end], 1)
                topk = {mode: kd(student, top_teachers, rows_mask, mode) for mode in ("imp", "hyper")}
                entropy = losses.masked_entropy(top_teachers, rows_mask)
                # Mass of the k kept positions (the k largest at temperature 1 are the k largest at tau too).
                kept_mass = {tau: p.topk(min(k, length), -1).values.sum(-1)[:, row_valid] for tau, p in probs.items()}
                result["k"][str(k)] = dict(
                    bytes_per_feature=size / (k_teachers * features),
                    bytes_ratio_dense_over_topk=dense_bytes / size,
                    kept_mass_mean=kept_mass[1.0].mean().item(),
                    kept_mass_p1=kept_mass[1.0].quantile(0.01).item(),
                    kept_mass_at_tau_mean=kept_mass[TAU].mean().item(),
                    entropy_dev_mean=(entropy - dense_entropy).mean().item(),
                    **deviations(dense, topk, row_valid),
                )
            report["regimes"][regime] = result
    # Cache mode keeps every shard of D: what that takes at SQuAD scale with K branch
    # languages (every question language with every passage language: K^2 pairs, K teachers),
    # from the bytes per feature measured above (headers and feature ids included).
    trained = report["regimes"]["trained"]
    report["squad_scale_cache_gb"] = {}
    for languages in (3, 7):
        squad_features = int(SQUAD_EXAMPLES * FEATURES_PER_EXAMPLE * languages**2)
        report["squad_scale_cache_gb"][f"K={languages}"] = dict(
            features=squad_features, teachers=languages,
            dense=languages * squad_features * trained["dense"]["bytes_per_feature"] / 1e9,
            **{f"top{k}": languages * squad_features * trained["k"][str(k)]["bytes_per_feature"] / 1e9 for k in KS},
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    return report


def print_table(report: dict) -> None:
    print(f"{report['machine']}, L = {report['config']['seq_len']}, K = {report['config']['teachers']}, "
          f"{report['config']['features']} features, float16")
    print("| regime | k | bytes/feature (dense / top-k) | kept mass, tau 1: mean (p1); tau 2: mean "
          "| KD loss rel. dev. imp / hyper | KD target TV imp | KD grad rel. L1 imp | imp weight abs. dev. mean / max "
          "| teacher entropy dev. (nats) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for regime, result in report["regimes"].items():
        dense = result["dense"]["bytes_per_feature"]
        for k, r in result["k"].items():
            print(f"| {regime} | {k} | {dense:.0f} / {r['bytes_per_feature']:.0f} ({r['bytes_ratio_dense_over_topk']:.1f}x) "
                  f"| {r['kept_mass_mean']:.3f} ({r['kept_mass_p1']:.3f}); {r['kept_mass_at_tau_mean']:.3f} "
                  f"| {r['imp']['kd_loss_rel_dev']:.3f} / {r['hyper']['kd_loss_rel_dev']:.3f} "
                  f"| {r['imp']['target_tv_mean']:.3f} | {r['imp']['kd_grad_rel_l1']:.3f} "
                  f"| {r['imp']['weight_abs_dev_mean']:.4f} / {r['imp']['weight_abs_dev_max']:.3f} "
                  f"| {r['entropy_dev_mean']:+.3f} |")
    for name, squad in report["squad_scale_cache_gb"].items():
        print(f"SQuAD-scale cache ({name}, |D| = {squad['features']}): dense {squad['dense']:.2f} GB, "
              + ", ".join(f"top-{k} {squad[f'top{k}']:.2f} GB" for k in KS))


if __name__ == "__main__":
    main()
