"""Every Triton kernel variant the launchers choose compiles for the A100 (sm_80) and the
H100/H200 (sm_90), without a GPU (dist_xqa/kernels/aot.py): TTIR, PTX and ptxas' cubin for
float32, float16 and bfloat16 inputs at the representative shapes (KD: K = 1..8, L = 384 and
512, imp and hyper; alignment: I = J = 384 and 2048, hidden 384, 768 and 1024), with the
tiles and warps of the launchers' own launch_meta. Every variant fits its target's shared
memory, and the self-check's variant keys never cover two of Triton's specialisations.

The compile runs in a child process without TRITON_INTERPRET (the test session's kernels are
the interpreter's stand-ins; tests/conftest.py), once for the module: ~100 variants in 30 s
on 2 idle cores, over 60 s on shared ones, hence `slow`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
# The most dynamic shared memory one block may use (CUDA programming guide).
SHARED_LIMIT = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}
KD_DTYPES = {"float32", "float16", "bfloat16", "float32/float16", "float32/bfloat16"}
ALIGNMENT_KERNELS = {"_alignment_fwd_kernel", "_alignment_bwd_dht_kernel", "_alignment_bwd_dhs_kernel"}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "kernels_aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "dist_xqa.kernels.aot", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(out.read_text())


def test_every_variant_compiles_for_both_targets(report):
    variants = report["variants"]
    assert [v for v in variants if "error" in v] == []
    for v in variants:
        assert 0 < v["registers"] <= 255 and v["cubin_bytes"] > 0
    covered = {(v["kernel"], v["arch"], v["dtype"]) for v in variants}
    expected = {("_kd_rows_kernel", arch, dtype) for arch in SHARED_LIMIT for dtype in KD_DTYPES}
    expected |= {(kernel, arch, dtype) for kernel in ALIGNMENT_KERNELS for arch in SHARED_LIMIT
                 for dtype in ("float32", "float16", "bfloat16")}
    assert covered == expected


def test_every_representative_call_is_covered_once_per_target(report):
    # KD: 5 dtype pairs x 2 lengths x 8 teacher counts x 2 modes, one launch each; alignment:
    # 3 dtypes x 2 lengths x 3 hidden sizes, three launches each (forward, dh_t, dh_s).
    assert report["calls"] == 5 * 2 * 8 * 2 + 3 * 2 * 3
    for arch in SHARED_LIMIT:
        served = [call for v in report["variants"] if v["arch"] == arch for call in v["calls"]]
        kd_calls = [c for c in served if c.startswith("kd ")]
        alignment_calls = [c for c in served if c.startswith("alignment ")]
        assert len(kd_calls) == 5 * 2 * 8 * 2 and len(alignment_calls) == 3 * 2 * 3 * 3
    # identical variants were compiled once: less than half a compile per launch
    assert len(report["variants"]) <= 5 * 2 * 8 * 2 + 3 * 2 * 3 * 3


def test_every_variant_fits_its_targets_shared_memory(report):
    for v in report["variants"]:
        assert v["shared_limit"] == SHARED_LIMIT[v["arch"]]
        assert 0 <= v["shared"] <= SHARED_LIMIT[v["arch"]], v


def test_variant_keys_match_tritons_specialisation(report):
    assert report["key_mismatches"] == []


def test_a_variant_the_gpu_compiler_rejects_is_reported():
    # The interpreter runs an 8-wide dot; the GPU compiler does not (tl.dot needs K >= 16).
    # The alignment forward with that tile is compiled the way every variant above is.
    script = """
import json, torch
from dist_xqa.kernels import aot
launch = aot.alignment_call(dict(B=2, I=384, J=384, H=768), torch.bfloat16)[0]
narrow = launch._replace(meta=dict(launch.meta, BLOCK_H=8))
record = aot.compile_variant(dict(aot.specialise(narrow, 80), dtype="bfloat16", calls=["narrow dot"]))
print(json.dumps(dict(record=record, problems=aot.problems(dict(variants=[record], key_mismatches=[])))))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300, check=True)
    result = json.loads(done.stdout.splitlines()[-1])
    assert "K >= 16" in result["record"]["error"] and "registers" not in result["record"]
    assert len(result["problems"]) == 1 and "_alignment_fwd_kernel sm_80 bfloat16" in result["problems"][0]
