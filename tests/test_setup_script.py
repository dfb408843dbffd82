"""scripts/setup.sh's plan (--dry-run) and scripts/gpu_check.sh's refusal, driven by a
stand-in nvidia-smi on PATH. Each run works on a copy of the scripts in a temporary
checkout and must leave it as it found it: no venv, no apt-get, no pip install, no
results; pip is kept off the network (PIP_NO_INDEX)."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GPU_LIST = "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0f1e2d3c)\nGPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-4b5a6978)\n"


def executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A checkout holding what the scripts read before they would change anything."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    for name in ("scripts/setup.sh", "scripts/gpu_check.sh", "requirements.txt"):
        shutil.copy(ROOT / name, repo / name)
    return repo


@pytest.fixture
def path_without_nvidia_smi(tmp_path: Path) -> str:
    """PATH as it is, less any nvidia-smi: a folder of links to every other command on it
    (a GPU host's nvidia-smi sits in /usr/bin beside bash, which must stay reachable)."""
    links = tmp_path / "path"
    links.mkdir()
    for folder in os.environ["PATH"].split(os.pathsep):
        if not os.path.isdir(folder):
            continue
        for entry in os.scandir(folder):
            link = links / entry.name
            if entry.name != "nvidia-smi" and not os.path.lexists(link) and os.access(entry.path, os.X_OK):
                link.symlink_to(entry.path)
    return str(links)


def stand_ins(tmp_path: Path, base_path: str, nvidia_smi: str | None) -> str:
    """PATH with a stand-in nvidia-smi (its script body, or none) and an apt-get that
    records being called, ahead of `base_path`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    executable(bin_dir / "apt-get", f"#!/bin/sh\ntouch {tmp_path}/apt-get-called\nexit 1\n")
    if nvidia_smi is not None:
        executable(bin_dir / "nvidia-smi", "#!/bin/sh\n" + nvidia_smi)
    return f"{bin_dir}{os.pathsep}{base_path}"


def tree(repo: Path) -> list[str]:
    return sorted(str(p.relative_to(repo)) for p in repo.rglob("*"))


def run(script: str, repo: Path, path: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("TORCH_BUILD", "TORCH_INDEX_URL", "VENV")}
    before = tree(repo)
    result = subprocess.run(["bash", str(repo / "scripts" / script), *args], cwd=repo, capture_output=True,
                            text=True, timeout=120, env={**clean, "PATH": path, "PIP_NO_INDEX": "1", **env})
    assert tree(repo) == before, f"{script} {' '.join(args)} changed the checkout"
    return result


def plan(result: subprocess.CompletedProcess) -> dict[str, str]:
    """The dry run's 'setup: <topic>: <text>' lines, by topic."""
    assert result.returncode == 0, result.stderr
    lines = [line.removeprefix("setup: ") for line in result.stdout.splitlines()]
    assert lines[0] == "dry run: nothing is changed"
    return dict(line.split(": ", 1) for line in lines[1:])


def test_a_running_nvidia_smi_plans_the_cuda_build_from_the_default_index(tmp_path, checkout,
                                                                           path_without_nvidia_smi):
    path = stand_ins(tmp_path, path_without_nvidia_smi, f"cat <<'EOF'\n{GPU_LIST}EOF\n")
    got = plan(run("setup.sh", checkout, path, "--dry-run"))
    assert got["torch build"] == "cuda (nvidia-smi runs: 2 GPU(s), GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0f1e2d3c))"
    assert got["torch source"].endswith(": pip install torch==2.13.0")
    assert "nvidia-* wheels" in got["torch source"]
    assert got["venv"] == f"{checkout}/.venv would be created with " + got["venv"].split(" with ")[1]
    assert not (tmp_path / "apt-get-called").exists()


def test_without_nvidia_smi_the_cpu_build_is_planned(tmp_path, checkout, path_without_nvidia_smi):
    path = stand_ins(tmp_path, path_without_nvidia_smi, None)
    got = plan(run("setup.sh", checkout, path, "--dry-run"))
    assert got["torch build"] == "cpu (no nvidia-smi on PATH: no NVIDIA driver)"
    # a +cpu build among pip's own sources (a local wheel) or PyTorch's CPU index, never PyPI's CUDA build
    assert ("hold torch 2.13.0+cpu: pip install torch==2.13.0" in got["torch source"]
            or got["torch source"].endswith("pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0"))
    assert not (tmp_path / "apt-get-called").exists()


def test_an_nvidia_smi_that_fails_plans_the_cpu_build_and_says_why(tmp_path, checkout, path_without_nvidia_smi):
    failing = "echo \"NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\"\nexit 9\n"
    path = stand_ins(tmp_path, path_without_nvidia_smi, failing)
    got = plan(run("setup.sh", checkout, path, "--dry-run"))
    assert got["torch build"].startswith("cpu (nvidia-smi is on PATH but fails (no driver loaded?): NVIDIA-SMI has")


@pytest.mark.parametrize("smi, torch_build, expect", [
    (f"cat <<'EOF'\n{GPU_LIST}EOF\n", "cpu", "cpu (TORCH_BUILD=cpu)"),  # a GPU, but the CPU build asked for
    (None, "cuda", "cuda (TORCH_BUILD=cuda)"),  # e.g. a login node setting up for the GPU nodes
])
def test_torch_build_overrides_what_nvidia_smi_says(tmp_path, checkout, path_without_nvidia_smi, smi, torch_build,
                                                     expect):
    path = stand_ins(tmp_path, path_without_nvidia_smi, smi)
    assert plan(run("setup.sh", checkout, path, "--dry-run", TORCH_BUILD=torch_build))["torch build"] == expect


def test_torch_index_url_picks_the_cuda_index_for_an_older_driver(tmp_path, checkout, path_without_nvidia_smi):
    path = stand_ins(tmp_path, path_without_nvidia_smi, f"cat <<'EOF'\n{GPU_LIST}EOF\n")
    got = plan(run("setup.sh", checkout, path, "--dry-run", TORCH_INDEX_URL="https://download.pytorch.org/whl/cu126"))
    assert got["torch source"] == ("TORCH_INDEX_URL: pip install --index-url https://download.pytorch.org/whl/cu126 "
                                   "torch==2.13.0")


def test_an_unknown_torch_build_or_argument_is_refused(tmp_path, checkout, path_without_nvidia_smi):
    path = stand_ins(tmp_path, path_without_nvidia_smi, None)
    result = run("setup.sh", checkout, path, "--dry-run", TORCH_BUILD="rocm")
    assert result.returncode == 2 and "TORCH_BUILD must be cpu or cuda, got 'rocm'" in result.stderr
    result = run("setup.sh", checkout, path, "--dryrun")
    assert result.returncode == 2 and "unknown argument '--dryrun'" in result.stderr


@pytest.mark.parametrize("smi", [None, "echo 'No devices were found'\nexit 6\n"], ids=["missing", "failing"])
def test_gpu_check_refuses_without_a_gpu_and_writes_nothing(tmp_path, checkout, path_without_nvidia_smi, smi):
    result = run("gpu_check.sh", checkout, stand_ins(tmp_path, path_without_nvidia_smi, smi))
    assert result.returncode == 3, result.stderr
    assert "no GPU here (nvidia-smi is missing or fails)" in result.stderr and "--force" in result.stderr
    assert not (tmp_path / "apt-get-called").exists()
