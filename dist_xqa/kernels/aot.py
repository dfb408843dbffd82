"""Ahead-of-time compilation of the Triton kernels for the GPUs users have, without a GPU.

For each target (sm_80: A100; sm_90: H100/H200), input dtype and representative call (KD:
R = 64 rows, K = 1..8 teachers, L = 384 and 512, imp and hyper; alignment: I = J = 384 and
2048, hidden 384, 768 and 1024) this builds the launches exactly as the launchers do
(kd.plan, alignment.forward_plan and backward_plan, whose tiles and warps come from their
launch_meta) from meta tensors, derives Triton's specialisation of their arguments with
Triton's own binder (what a launch on a GPU would compile), keeps one of each identical
variant, and compiles it for the target with triton.compile: TTIR, PTX, and ptxas' cubin, so
that a program the GPU compiler rejects fails here. ptxas' report (-v, which Triton runs with)
gives the registers and spill bytes per thread, the compiled metadata the shared memory per
block, which must fit the target's limit (SHARED_LIMIT).

The same binder also checks the launchers' `variant` keys, under which the first-use
self-check (selfcheck.py) keeps its verdicts: calls with one key must compile to one variant.

The kernels must be triton.jit functions, not the interpreter's stand-ins, so this runs in a
process without TRITON_INTERPRET=1: `python -m dist_xqa.kernels.aot --out FILE` (what
tests/test_kernel_aot.py and `python benchmarks/kernels.py aot` start) writes the JSON report
and exits non-zero on a compile error, a variant over its shared-memory limit, or a variant
key that covers two specialisations.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from dist_xqa.kernels import alignment, kd
from dist_xqa.kernels.launch import Launch

TARGETS = {80: "A100", 90: "H100/H200"}
# Most dynamic shared memory one block may use (CUDA programming guide, compute capabilities).
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# KD: (student, teachers). Students train in any of the three; the logit store holds float16
# or bfloat16 teachers (dist_xqa.logits.shards), which a float32 student also meets.
KD_DTYPES = [(d, d) for d in DTYPES] + [(torch.float32, torch.float16), (torch.float32, torch.bfloat16)]
KD_SHAPES = [dict(R=64, L=length, K=k, mode=mode)
             for length in (384, 512) for k in range(1, 9) for mode in ("imp", "hyper")]
ALIGNMENT_SHAPES = [dict(B=2, I=n, J=n, H=hidden) for n in (384, 2048) for hidden in (384, 768, 1024)]
# Shapes of every integer class (1, divisible by 16, other) for the variant-key check only.
KEY_CHECK_KD = [dict(R=r, L=length, K=k, mode=mode) for r, length, k in ((1, 1, 1), (3, 383, 5), (16, 1, 2),
                                                                        (5, 48, 16), (4, 20, 3), (64, 384, 3))
                for mode in ("imp", "hyper")]
KEY_CHECK_ALIGNMENT = [dict(B=b, I=i, J=j, H=h) for b, i, j, h in ((1, 1, 1, 16), (2, 37, 70, 24), (2, 384, 70, 768),
                                                                   (3, 33, 384, 100), (2, 1, 384, 384))]


def kd_call(shape: dict, dtypes: tuple[torch.dtype, torch.dtype]) -> list[Launch]:
    """kd.plan's launches for one call of `shape` on meta tensors."""
    rows, length, k = shape["R"], shape["L"], shape["K"]
    student = torch.empty(rows, length, dtype=dtypes[0], device="meta")
    teachers = torch.empty(k, rows, length, dtype=dtypes[1], device="meta")
    mask = torch.empty(rows, length, dtype=torch.bool, device="meta")
    return kd.plan(student, teachers, mask, 2.0, shape["mode"], None, -1.0, None)[0]


def kd_key(shape: dict, dtypes: tuple[torch.dtype, torch.dtype]) -> tuple:
    rows, length, k = shape["R"], shape["L"], shape["K"]
    return kd.variant(torch.empty(rows, length, dtype=dtypes[0], device="meta"),
                      torch.empty(k, rows, length, dtype=dtypes[1], device="meta"),
                      torch.empty(rows, length, dtype=torch.bool, device="meta"), shape["mode"])


def alignment_inputs(shape: dict, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, hidden = shape["B"], shape["H"]
    return (torch.empty(batch, shape["I"], hidden, dtype=dtype, device="meta"),
            torch.empty(batch, shape["J"], hidden, dtype=dtype, device="meta"),
            torch.empty(batch, shape["J"], dtype=torch.bool, device="meta"))


def alignment_call(shape: dict, dtype: torch.dtype) -> list[Launch]:
    """The forward's and both gradients' launches for one call of `shape` on meta tensors."""
    forward, (h_t, h_s, s_mask, entropy, row_max, log_s, cmean) = alignment.forward_plan(
        *alignment_inputs(shape, dtype))
    backward = alignment.backward_plan(h_t, h_s, s_mask, row_max, log_s, cmean, entropy, (True, True))[0]
    return forward + backward


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def calls() -> Iterator[tuple[str, str, list[Launch]]]:
    """(dtype name, shape description, launches) of every representative call."""
    for dtypes in KD_DTYPES:
        name = _name(dtypes[0]) + ("" if dtypes[0] == dtypes[1] else f"/{_name(dtypes[1])}")
        for shape in KD_SHAPES:
            yield name, "kd " + " ".join(f"{k}={v}" for k, v in shape.items()), kd_call(shape, dtypes)
    for dtype in DTYPES:
        for shape in ALIGNMENT_SHAPES:
            yield (_name(dtype), "alignment " + " ".join(f"{k}={v}" for k, v in shape.items()),
                   alignment_call(shape, dtype))


def specialise(launch: Launch, arch: int) -> dict:
    """What triton.compile gets for `launch` on the target: Triton's binder and argument
    packing (triton.runtime.jit, as JITFunction.run calls them), applied to the launch's
    arguments and meta instead of a device's."""
    kernel = launch.kernel
    if not isinstance(kernel, JITFunction):
        raise RuntimeError("dist_xqa.kernels.aot needs the compiled kernels: run it without TRITON_INTERPRET=1")
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    # the options JITFunction.run adds to every launch's
    meta = dict(launch.meta, debug=kernel.debug or knobs.runtime.debug,
                instrumentation_mode=knobs.compilation.instrumentation_mode)
    bound, specialization, options = binder(*launch.args, **meta)
    options, signature, constexprs, attrs = kernel._pack_args(backend, meta, bound, specialization, options)
    return dict(module=kernel.fn.__module__, kernel=kernel.fn.__name__, arch=arch, signature=signature,
                constexprs=constexprs, attrs=attrs, options=options.__dict__)


def _job_key(job: dict) -> str:
    return repr([job["kernel"], job["arch"], job["signature"], sorted(job["constexprs"].items()),
                 sorted(job["attrs"].items()), job["options"]["num_warps"]])


def variants() -> list[dict]:
    """One compile job per distinct (kernel, target, specialisation), with the calls it serves."""
    jobs: dict[str, dict] = {}
    for arch in TARGETS:
        for dtype, description, launches in calls():
            for launch in launches:
                job = specialise(launch, arch)
                job = jobs.setdefault(_job_key(job), dict(job, dtype=dtype, calls=[]))
                job["calls"].append(description)
    return list(jobs.values())


_PTXAS = {
    "registers": re.compile(r"Used (\d+) registers"),
    "stack_frame": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}


def compile_variant(job: dict) -> dict:
    """Compiles one job for its target; returns its record (registers, spills, shared memory)
    or, for a compile failure, the error."""
    kernel = getattr(importlib.import_module(job["module"]), job["kernel"])
    constexprs = {name: job["constexprs"][(i,)] for i, name in enumerate(kernel.arg_names) if (i,) in job["constexprs"]}
    record = dict(kernel=job["kernel"], arch=f"sm_{job['arch']}", gpu=TARGETS[job["arch"]], dtype=job["dtype"],
                  constexprs=constexprs, num_warps=job["options"]["num_warps"],
                  num_stages=job["options"]["num_stages"], calls=job["calls"],
                  shared_limit=SHARED_LIMIT[job["arch"]])
    log = io.StringIO()
    start = time.perf_counter()
    try:
        # Triton prints ptxas' -v report when asked (TRITON_DUMP_PTXAS_LOG, set by run).
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(kernel, job["signature"], job["constexprs"], job["attrs"]),
                                      target=GPUTarget("cuda", job["arch"], 32), options=job["options"])
    except Exception as error:  # every compile failure is a result to report
        return dict(record, error=_describe(error))
    record["compile_s"] = round(time.perf_counter() - start, 2)
    report = log.getvalue()
    for name, pattern in _PTXAS.items():
        found = pattern.search(report)
        if found is None:
            return dict(record, error=f"no {name!r} in ptxas' report: {report!r}")
        record[name] = int(found.group(1))
    record["shared"] = compiled.metadata.shared
    record["cubin_bytes"] = len(compiled.asm["cubin"])
    return record


def _describe(error: BaseException) -> str:
    """The error and its causes, one line: Triton's CompilationError quotes the source line,
    the reason (e.g. a dot tile under 16) is its cause."""
    chain = []
    while error is not None:
        chain.append(f"{type(error).__name__}: " + " ".join(str(error).split())[-500:])
        error = error.__cause__
    return " <- ".join(chain)


def key_mismatches() -> list[str]:
    """Pairs of calls whose `variant` key is equal but whose Triton specialisation is not."""
    seen: dict[tuple, tuple[str, list[str]]] = {}
    mismatches = []
    cases = [(kd_key(shape, dtypes), f"kd {shape} {dtypes}", kd_call(shape, dtypes))
             for dtypes in KD_DTYPES for shape in KEY_CHECK_KD]
    cases += [(alignment.variant(*alignment_inputs(shape, dtype)), f"alignment {shape} {dtype}",
               alignment_call(shape, dtype)) for dtype in DTYPES for shape in KEY_CHECK_ALIGNMENT]
    for key, description, launches in cases:
        specialisations = [_job_key(specialise(launch, 90)) for launch in launches]
        earlier = seen.setdefault(key, (description, specialisations))
        if earlier[1] != specialisations:
            mismatches.append(f"{earlier[0]} and {description}: one key, two specialisations")
    return mismatches


def run(jobs: int) -> dict:
    """Compiles every variant (in `jobs` processes) and checks the variant keys. For the
    `python -m` process alone: it sets the environment its spawned workers inherit, always
    compile (a cache hit would skip ptxas and its report) into a cache of this run's own."""
    todo = variants()
    with tempfile.TemporaryDirectory(prefix="dist_xqa_aot_") as cache:
        os.environ.update(TRITON_ALWAYS_COMPILE="1", TRITON_DUMP_PTXAS_LOG="1", TRITON_CACHE_DIR=cache)
        start = time.perf_counter()
        with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
            records = list(pool.map(compile_variant, todo))
        seconds = time.perf_counter() - start
    return dict(triton=triton.__version__, targets={f"sm_{a}": TARGETS[a] for a in TARGETS},
                shared_limit={f"sm_{a}": SHARED_LIMIT[a] for a in SHARED_LIMIT},
                calls=sum(1 for _ in calls()), variants=records, compile_wall_s=round(seconds, 1),
                key_mismatches=key_mismatches())


def problems(report: dict) -> list[str]:
    """What makes the report a failure: compile errors, variants over their shared-memory
    limit, variant keys covering two specialisations."""
    found = [f"{r['kernel']} {r['arch']} {r['dtype']} {r['constexprs']}: {r['error']}"
             for r in report["variants"] if "error" in r]
    found += [f"{r['kernel']} {r['arch']} {r['dtype']} {r['constexprs']}: shared {r['shared']} B over "
              f"{r['shared_limit']} B" for r in report["variants"] if r.get("shared", 0) > r["shared_limit"]]
    return found + report["key_mismatches"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON report to write")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiling processes")
    args = parser.parse_args(argv)
    report = run(args.jobs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    failed = problems(report)
    print(f"{len(report['variants'])} variants of {report['calls']} calls compiled in "
          f"{report['compile_wall_s']} s; wrote {args.out}")
    for problem in failed:
        print("FAILED:", problem, file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
