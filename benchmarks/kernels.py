"""Benchmark the fused loss kernels against the eager reference and torch.compile(reference).

Writes JSON (default benchmarks/results/kernels.json) and prints a table:

- aggregation + KD (dist_xqa.kernels.entropy_weighted_kd): forward+backward time and peak
  extra memory for R = 2*64 rows, L in {384, 512}, K in {3, 8}, bf16 and fp32, plus the
  memory-bandwidth bound (minimal bytes moved / peak bandwidth) and the fused kernel's
  fraction of it;
- alignment entropy (dist_xqa.kernels.alignment_entropy): forward+backward time and peak
  extra memory for B = 16, H = 768, I = J in {384, 1024, 2048}, bf16;
- the share of one student training step (tiny and base-size encoder, batch 32, L = 384,
  K = 3 teachers) spent in the loss, eager vs fused.

Forward and forward+backward are timed separately (backward = the difference). The JSON
records the device's name.

Run on a GPU node:  python benchmarks/kernels.py
On a CPU (no GPU):  python benchmarks/kernels.py --smoke   (tiny shapes, the fused path through
                    the Triton interpreter: proves the script runs, its times mean nothing;
                    exits non-zero if a fused or eager variant failed; without --smoke the
                    script refuses to run on a CPU)
Anywhere, no GPU:   python benchmarks/kernels.py aot      (compiles every kernel variant the
                    launchers choose for sm_80 and sm_90, dist_xqa/kernels/aot.py; writes
                    results/kernels_aot.json and the ptxas table of RESULTS.md; exits non-zero
                    on a compile error or a variant over its shared-memory limit)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Callable

import torch

if not torch.cuda.is_available():
    # Without a GPU the fused path runs through the Triton interpreter, which triton picks when
    # a kernel is defined (dist_xqa.kernels defines them on first use).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402

from dist_xqa import kernels, losses  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "kernels.json"
AOT_OUT = Path(__file__).resolve().parent / "results" / "kernels_aot.json"
RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"
AOT_MARKERS = ("<!-- kernels:aot begin -->", "<!-- kernels:aot end -->")

FULL = dict(
    kd_rows=128, kd_lengths=[384, 512], kd_teachers=[3, 8], kd_dtypes=["bfloat16", "float32"],
    align_batch=16, align_hidden=768, align_lengths=[384, 1024, 2048], align_dtypes=["bfloat16"],
    step_batch=32, step_length=384, step_models=["tiny", "base"], warmup=5, iters=20,
)
# float32 throughout: the interpreter computes bfloat16 tl.dot (the alignment kernels') wrongly.
SMOKE = dict(
    kd_rows=4, kd_lengths=[33], kd_teachers=[3], kd_dtypes=["float32"],
    align_batch=1, align_hidden=48, align_lengths=[40], align_dtypes=["float32"],
    step_batch=2, step_length=48, step_models=["smoke"], warmup=1, iters=2,
)
# Encoder sizes for the step share: "base" is XLM-R base; "tiny" a small test-size encoder.
ENCODERS = {
    "smoke": dict(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=64),
    "tiny": dict(vocab_size=250002, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=512),
    "base": dict(vocab_size=250002, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", nargs="?", choices=["bench", "aot"], default="bench",
                        help="bench (default): time the kernels; aot: compile them for sm_80/sm_90")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"JSON file to write (default {DEFAULT_OUT.name}, aot: {AOT_OUT.name})")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="aot: compiling processes")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes; runs on a CPU")
    parser.add_argument("--sections", nargs="+", default=["aggregation", "alignment", "step"],
                        choices=["aggregation", "alignment", "step"])
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile(reference)")
    parser.add_argument("--peak-gbps", type=float, default=None,
                        help="peak memory bandwidth in GB/s for the bound (default: measured copy)")
    return parser.parse_args(argv)


# --- measuring --------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(step: Callable[[], None], device: torch.device, warmup: int, iters: int) -> dict:
    """Median wall time (ms) of `step` and its peak memory above what was allocated before."""
    for _ in range(warmup):
        step()
    _sync(device)
    base = 0
    if device.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if device.type == "cuda" else None
    return dict(ms=statistics.median(times), peak_extra_mib=peak)


def run_variant(name: str, make_step: Callable[[], Callable[[], None]], device, cfg) -> dict:
    """Measure one implementation; a failure (e.g. a compiler missing) is recorded, not fatal."""
    try:
        return dict(impl=name, **measure(make_step(), device, cfg["warmup"], cfg["iters"]))
    except Exception as error:  # noqa: BLE001 - keep the other numbers of a long GPU run
        return dict(impl=name, error=f"{type(error).__name__}: {error}")


def run_passes(name: str, forward: Callable[[], torch.Tensor], inputs: list[torch.Tensor], device, cfg) -> dict:
    """Times `forward` (which returns the loss) alone and followed by the backward into
    `inputs`: fwd_ms, ms (forward + backward), bwd_ms (their difference) and the peak extra
    memory of each (peak_extra_mib: forward + backward)."""

    def forward_only():
        forward()

    def step():
        forward().backward()
        for tensor in inputs:
            tensor.grad = None

    fwd = run_variant(name, lambda: forward_only, device, cfg)
    result = dict(run_variant(name, lambda: step, device, cfg), fwd_ms=fwd.get("ms"),
                  fwd_peak_extra_mib=fwd.get("peak_extra_mib"))
    if "ms" in fwd and "ms" in result:
        result["bwd_ms"] = result["ms"] - fwd["ms"]
    if "error" in fwd:
        result.setdefault("error", fwd["error"])
    return result


def copy_bandwidth_gbps(device: torch.device) -> float:
    """Achieved device-to-device copy bandwidth (read + write bytes per second)."""
    numel = (256 if device.type == "cuda" else 16) * 2**20
    src = torch.empty(numel, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    timing = measure(lambda: dst.copy_(src), device, warmup=3, iters=10)
    return 2 * src.numel() * src.element_size() / (timing["ms"] * 1e-3) / 1e9


def implementations(reference: Callable, fused: Callable, use_compile: bool) -> dict[str, Callable]:
    impls = {"fused": fused, "eager": reference}
    if use_compile:
        impls["compile"] = torch.compile(reference)
    return impls


# --- the cases --------------------------------------------------------------------------------


def qa_mask(rows: int, length: int, device, seed: int = 0) -> torch.Tensor:
    """Answer-position masks like real features: CLS, a context span, then padding."""
    gen = torch.Generator().manual_seed(seed)
    question = min(20, max(1, length // 4))
    ends = torch.randint(length // 2, length + 1, (rows,), generator=gen)
    positions = torch.arange(length)
    mask = (positions[None, :] > question) & (positions[None, :] < ends[:, None])
    mask[:, 0] = True
    return mask.to(device)


def bench_aggregation(cfg: dict, device, use_compile: bool, bandwidth_gbps: float) -> list[dict]:
    results = []
    rows = cfg["kd_rows"]
    for dtype_name in cfg["kd_dtypes"]:
        dtype = getattr(torch, dtype_name)
        for length in cfg["kd_lengths"]:
            for k in cfg["kd_teachers"]:
                student = torch.randn(rows, length, device=device, dtype=dtype, requires_grad=True)
                teachers = 3 * torch.randn(k, rows, length, device=device, dtype=dtype)
                mask = qa_mask(rows, length, device)
                element = student.element_size()
                # minimal traffic: read teachers, student and mask once, write the gradient once
                min_bytes = (k + 2) * rows * length * element + rows * length
                bound_ms = min_bytes / (bandwidth_gbps * 1e9) * 1e3
                impls = implementations(
                    partial(kernels.entropy_weighted_kd, impl="reference"),
                    partial(kernels.entropy_weighted_kd, impl="triton"),
                    use_compile,
                )
                for name, fn in impls.items():
                    result = run_passes(name, lambda fn=fn: fn(student, teachers, mask, 2.0, "imp")[0],
                                        [student], device, cfg)
                    result.update(R=rows, L=length, K=k, dtype=dtype_name, min_bytes=min_bytes,
                                  bound_ms=bound_ms)
                    if "ms" in result:
                        result["fraction_of_bound"] = bound_ms / result["ms"]
                    results.append(result)
    return results


def bench_alignment(cfg: dict, device, use_compile: bool) -> list[dict]:
    results = []
    batch, hidden = cfg["align_batch"], cfg["align_hidden"]
    for dtype_name in cfg["align_dtypes"]:
        dtype = getattr(torch, dtype_name)
        for length in cfg["align_lengths"]:
            h_t = torch.randn(batch, length, hidden, device=device, dtype=dtype, requires_grad=True)
            h_s = torch.randn(batch, length, hidden, device=device, dtype=dtype, requires_grad=True)
            t_mask = qa_mask(batch, length, device, seed=1)
            s_mask = qa_mask(batch, length, device, seed=2)
            impls = implementations(
                partial(kernels.alignment_entropy, impl="reference"),
                partial(kernels.alignment_entropy, impl="triton"),
                use_compile,
            )
            for name, fn in impls.items():
                result = run_passes(name, lambda fn=fn: fn(h_t, h_s, t_mask, s_mask), [h_t, h_s], device, cfg)
                result.update(B=batch, I=length, J=length, H=hidden, dtype=dtype_name)
                results.append(result)
    return results


def bench_step_share(cfg: dict, device) -> list[dict]:
    """Time of one student step (forward, loss, backward, AdamW) vs the loss alone."""
    from transformers import XLMRobertaConfig, XLMRobertaForQuestionAnswering

    results = []
    batch, length, k = cfg["step_batch"], cfg["step_length"], 3
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    for model_name in cfg["step_models"]:
        config = XLMRobertaConfig(max_position_embeddings=length + 2, **ENCODERS[model_name])
        model = XLMRobertaForQuestionAnswering(config).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, eps=1e-8, weight_decay=0.005)
        input_ids = torch.randint(5, config.vocab_size, (batch, length), device=device)
        mask = qa_mask(batch, length, device)
        teacher_start = 3 * torch.randn(k, batch, length, device=device, dtype=torch.bfloat16)
        teacher_end = 3 * torch.randn(k, batch, length, device=device, dtype=torch.bfloat16)
        start_pos = torch.zeros(batch, dtype=torch.long, device=device)  # CLS: valid everywhere
        end_pos = (mask * torch.arange(length, device=device)).argmax(-1)  # last valid position
        logits = [torch.randn(batch, length, device=device, requires_grad=True) for _ in range(2)]
        for impl, label in (("reference", "eager"), ("triton", "fused")):
            kd_fn = partial(kernels.entropy_weighted_kd, impl=impl)
            loss_of = partial(losses.student_loss, teacher_start=teacher_start, teacher_end=teacher_end,
                              mask=mask, start_pos=start_pos, end_pos=end_pos, kd_fn=kd_fn)

            def train_step():
                with autocast:
                    out = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
                loss_of(out.start_logits.float(), out.end_logits.float()).total.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            def loss_step():
                loss_of(*logits).total.backward()
                for tensor in logits:
                    tensor.grad = None

            step = run_variant(label, lambda: train_step, device, cfg)
            loss = run_variant(label, lambda: loss_step, device, cfg)
            result = dict(model=model_name, batch=batch, L=length, K=k, impl=label,
                          step_ms=step.get("ms"), loss_ms=loss.get("ms"))
            if "ms" in step and "ms" in loss:
                result["loss_share"] = loss["ms"] / step["ms"]
            for part in (step, loss):
                if "error" in part:
                    result["error"] = part["error"]
            results.append(result)
        del model, optimizer
    return results


# --- report -----------------------------------------------------------------------------------


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def print_table(title: str, rows: list[dict], columns: list[str]) -> None:
    print(f"\n## {title}")
    print(" | ".join(columns))
    for row in rows:
        print(" | ".join(_fmt(row.get(c)) for c in columns) + (f"  ERROR {row['error']}" if "error" in row else ""))


def summarise(report: dict) -> list[dict]:
    """Fused vs eager and vs torch.compile, per case: the numbers the targets are stated in."""
    summary = []
    for section, keys in (("aggregation", ("dtype", "L", "K")), ("alignment", ("dtype", "I", "H"))):
        cases: dict[tuple, dict[str, dict]] = {}
        for row in report.get(section, []):
            cases.setdefault(tuple(row[key] for key in keys), {})[row["impl"]] = row
        for case, by_impl in cases.items():
            fused = by_impl.get("fused", {})
            entry = dict(section=section, **dict(zip(keys, case)))
            for other in ("eager", "compile"):
                if "ms" in fused and "ms" in by_impl.get(other, {}):
                    entry[f"speedup_vs_{other}"] = by_impl[other]["ms"] / fused["ms"]
                    if fused.get("peak_extra_mib") and by_impl[other].get("peak_extra_mib"):
                        entry[f"memory_ratio_vs_{other}"] = fused["peak_extra_mib"] / by_impl[other]["peak_extra_mib"]
            entry["fraction_of_bound"] = fused.get("fraction_of_bound")
            summary.append(entry)
    return summary


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.command == "aot":
        return aot(args.out or AOT_OUT, args.jobs)
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        sys.exit("benchmarks/kernels.py: the benchmark needs a CUDA device; use --smoke on a CPU")
    device = torch.device("cuda" if cuda else "cpu")
    cfg = SMOKE if args.smoke else FULL
    # A smoke run never overwrites the GPU numbers.
    out = args.out or (DEFAULT_OUT.with_name("kernels_smoke.json") if args.smoke else DEFAULT_OUT)
    use_compile = not args.no_compile
    bandwidth = args.peak_gbps or copy_bandwidth_gbps(device)
    report = dict(
        device=torch.cuda.get_device_name(device) if cuda else "cpu (Triton interpreter)",
        note="smoke run: tiny shapes; the times measure the Triton interpreter, not the kernels"
        if args.smoke else "GPU benchmark",
        torch=torch.__version__, triton=triton.__version__, smoke=args.smoke, config=cfg,
        peak_bandwidth_gbps=bandwidth,
        bandwidth_source="--peak-gbps" if args.peak_gbps else "measured device copy",
    )
    if "aggregation" in args.sections:
        report["aggregation"] = bench_aggregation(cfg, device, use_compile, bandwidth)
        print_table("aggregation + KD (ms: fwd+bwd)", report["aggregation"],
                    ["dtype", "L", "K", "impl", "fwd_ms", "bwd_ms", "ms", "peak_extra_mib", "bound_ms",
                     "fraction_of_bound"])
    if "alignment" in args.sections:
        report["alignment"] = bench_alignment(cfg, device, use_compile)
        print_table("alignment entropy (ms: fwd+bwd)", report["alignment"],
                    ["dtype", "I", "H", "impl", "fwd_ms", "bwd_ms", "ms", "fwd_peak_extra_mib", "peak_extra_mib"])
    if "step" in args.sections:
        report["step_share"] = bench_step_share(cfg, device)
        print_table("loss share of a student step", report["step_share"],
                    ["model", "batch", "L", "impl", "step_ms", "loss_ms", "loss_share"])
    report["summary"] = summarise(report)
    print_table("fused vs eager / torch.compile", report["summary"],
                ["section", "dtype", "L", "K", "I", "H", "speedup_vs_eager", "speedup_vs_compile",
                 "memory_ratio_vs_eager", "fraction_of_bound"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out} ({report['device']}, bandwidth {bandwidth:.0f} GB/s)")
    failed = failures(report)
    if args.smoke and failed:
        # The smoke run exists to prove the script works: a fused or eager variant that failed
        # (recorded, not raised, so that a long GPU run keeps its other numbers) fails it.
        sys.exit("benchmarks/kernels.py --smoke: failed variants:\n  " + "\n  ".join(failed))
    return report


def failures(report: dict) -> list[str]:
    """The recorded errors of the fused and eager variants (torch.compile's depend on the
    toolchain, e.g. a C++ compiler on a CPU, and stay informational)."""
    return [
        f"{section} {row['impl']}: {row['error']}"
        for section in ("aggregation", "alignment", "step_share")
        for row in report.get(section, [])
        if "error" in row and row["impl"] in ("fused", "eager")
    ]


# --- ahead-of-time compile ------------------------------------------------------------------


def _calls_summary(calls: list[str]) -> str:
    """'kd R=64 L=384 K=5 mode=imp', ... -> 'L=384,512 K=5,6,7,8 mode=imp' (sizes that do not
    enter the variant, R and B, left out)."""
    values: dict[str, list[str]] = {}
    for call in calls:
        for item in call.split()[1:]:
            key, value = item.split("=")
            if key not in ("R", "B") and value not in values.setdefault(key, []):
                values[key].append(value)
    return " ".join(f"{key}={','.join(found)}" for key, found in values.items())


def aot_table(report: dict) -> str:
    """RESULTS.md's ptxas table: one row per variant, sm_80 and sm_90 side by side."""
    rows: dict[tuple, dict] = {}
    for v in report["variants"]:
        tiles = " ".join(f"{k}={val}" for k, val in v["constexprs"].items() if k.startswith("BLOCK") or k == "IMP")
        key = (v["kernel"].strip("_").removesuffix("_kernel"), v["dtype"], tiles, v["num_warps"])
        row = rows.setdefault(key, dict(calls=_calls_summary(v["calls"])))
        row[v["arch"]] = v
    archs = list(report["targets"])
    lines = ["| kernel | inputs | tiles | warps | calls | " + " | ".join(
                 f"{a} regs | {a} spill B | {a} shared B" for a in archs) + " |",
             "| --- " * (5 + 3 * len(archs)) + "|"]
    for (kernel, dtype, tiles, warps), row in rows.items():
        cells = []
        for arch in archs:
            v = row.get(arch, {})
            cells += [str(v.get(field, "-")) for field in ("registers", "spill_stores", "shared")]
        lines.append(f"| {kernel} | {dtype} | {tiles} | {warps} | {row['calls']} | " + " | ".join(cells) + " |")
    compiled = [v for v in report["variants"] if "error" not in v]
    failed = len(report["variants"]) - len(compiled)
    if not compiled:
        return f"All {failed} variants FAILED to compile (see {AOT_OUT.name}).\n\n" + "\n".join(lines)
    top = max(compiled, key=lambda v: v["registers"])
    spilled = [v for v in compiled if v["spill_stores"]]
    widest = max(compiled, key=lambda v: v["shared"])
    summary = (f"{len(report['variants'])} variants ({report['calls']} representative calls, each for "
               f"{' and '.join(archs)}) compiled with Triton {report['triton']} in "
               f"{report['compile_wall_s']} s{f', {failed} FAILED' if failed else ''}. Most registers: "
               f"{top['registers']} ({top['kernel']}, {top['dtype']}, {top['arch']}); spills in "
               f"{len(spilled)} variants, at most {max((v['spill_stores'] for v in spilled), default=0)} bytes "
               f"per thread; most shared memory: {widest['shared'] / 1024:g} KB ({widest['kernel']}, "
               f"{widest['dtype']}) of {report['shared_limit']['sm_80'] / 1024:g} KB (sm_80) and "
               f"{report['shared_limit']['sm_90'] / 1024:g} KB (sm_90).")
    return summary + "\n\n" + "\n".join(lines)


def aot(out: Path, jobs: int) -> dict:
    """Compiles every kernel variant for sm_80 and sm_90 (dist_xqa.kernels.aot, in a process
    without the interpreter this script may have chosen), writes `out` and the ptxas table
    between RESULTS.md's kernels:aot markers; exits non-zero on a failure."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out.unlink(missing_ok=True)  # never a table from an earlier run's report
    done = subprocess.run([sys.executable, "-m", "dist_xqa.kernels.aot", "--out", str(out), "--jobs", str(jobs)],
                          env=env, cwd=Path(__file__).resolve().parents[1])
    if not out.exists():
        sys.exit(f"benchmarks/kernels.py aot: the compile wrote no report (exit status {done.returncode})")
    report = json.loads(out.read_text())
    text = RESULTS_MD.read_text()
    begin, end = AOT_MARKERS
    if begin not in text or end not in text:
        sys.exit(f"benchmarks/kernels.py aot: {RESULTS_MD} lacks the markers {begin} ... {end}")
    head, rest = text.split(begin, 1)
    RESULTS_MD.write_text(f"{head}{begin}\n{aot_table(report)}\n{end}{rest.split(end, 1)[1]}")
    print(f"wrote {out} and the ptxas table in {RESULTS_MD}")
    if done.returncode:
        sys.exit(done.returncode)
    return report


if __name__ == "__main__":
    main()
