"""One teacher's start/end logits for one shard: a self-checking safetensors file.

Layout: `<store>/<teacher>/shard_<index:06d>.safetensors` holding the tensors
`feature_ids` (int64 [S]), `start` and `end` (float16 or bfloat16 [S, L]); the metadata
holds the format tag and the SHA-256 of the three tensors' bytes (in that order), so a
flipped byte anywhere in the data, or a header that no longer describes it, is caught.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch

from dist_xqa.logits.files import atomic_write

SHARD_FORMAT = "dist_xqa.logit_shard.v1"
LOGIT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
_TENSOR_NAMES = ("feature_ids", "start", "end")
_SHARD_NAME = re.compile(r"shard_(\d{6,})\.safetensors")


class ShardError(RuntimeError):
    """A shard file that is torn, corrupted, or not the shard it was asked for."""


@dataclass(frozen=True)
class ShardData:
    feature_ids: torch.Tensor  # int64 [S]
    start: torch.Tensor  # [S, L]
    end: torch.Tensor  # [S, L]


def shard_path(store_dir: str | Path, teacher: str, index: int) -> Path:
    """Where `teacher`'s logits for shard `index` live in the store."""
    return Path(store_dir) / teacher / f"shard_{index:06d}.safetensors"


def list_shards(teacher_dir: str | Path) -> dict[int, Path]:
    """The committed shard files in one teacher's directory, by shard index."""
    found = {}
    for path in Path(teacher_dir).glob("shard_*.safetensors"):
        match = _SHARD_NAME.fullmatch(path.name)
        if match:
            found[int(match.group(1))] = path
    return found


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in _TENSOR_NAMES:
        digest.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def write_shard(
    path: str | Path,
    feature_ids: Sequence[int] | torch.Tensor,
    start: torch.Tensor,
    end: torch.Tensor,
    dtype: torch.dtype = torch.float16,
) -> int:
    """Commits one shard file atomically (temporary name, fsync, rename) with the logits
    cast to `dtype`; returns its size in bytes."""
    path = Path(path)
    if dtype not in LOGIT_DTYPES.values():
        raise ValueError(f"{path}: logits dtype must be float16 or bfloat16, got {dtype}")
    ids = torch.as_tensor(feature_ids, dtype=torch.int64).flatten()
    if start.dim() != 2 or start.shape != end.shape or start.shape[0] != ids.numel() or ids.numel() == 0:
        raise ValueError(
            f"{path}: expected start and end logits of shape [S, L] with S = {ids.numel()} feature ids, "
            f"got start {tuple(start.shape)} and end {tuple(end.shape)}"
        )
    tensors = {
        "feature_ids": ids.contiguous(),
        "start": start.detach().to("cpu", dtype).contiguous(),
        "end": end.detach().to("cpu", dtype).contiguous(),
    }
    data = safetensors.torch.save(tensors, metadata={"format": SHARD_FORMAT, "sha256": _checksum(tensors)})
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data, durable=True)
    return len(data)


def read_shard(
    path: str | Path,
    feature_ids: Sequence[int] | None = None,
    dtype: torch.dtype | None = None,
) -> ShardData:
    """Reads and verifies one shard file: header, sizes, checksum, and, when given, that it
    holds exactly `feature_ids` (in order) with logits of `dtype`. Anything wrong raises
    ShardError naming the file and the problem; no data is returned from a bad file."""
    path = Path(path)

    def problem(message: str) -> ShardError:
        return ShardError(f"logit shard {path}: {message}")

    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise problem("does not exist") from None
    except OSError as e:
        raise problem(f"cannot be read ({e})") from e
    if len(raw) < 8:
        raise problem(f"is {len(raw)} bytes, too short to hold a header (torn write)")
    header_len = int.from_bytes(raw[:8], "little")
    if 8 + header_len > len(raw):
        raise problem(f"header claims {header_len} bytes but only {len(raw) - 8} follow (truncated)")
    try:
        header = json.loads(raw[8 : 8 + header_len])
        metadata = header.pop("__metadata__", None) or {}
        data_len = max(int(entry["data_offsets"][1]) for entry in header.values())
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise problem(f"header is not a valid safetensors header ({e!r})") from e
    if metadata.get("format") != SHARD_FORMAT:
        raise problem(f"metadata format is {metadata.get('format')!r}, expected {SHARD_FORMAT!r}")
    if sorted(header) != sorted(_TENSOR_NAMES):
        raise problem(f"holds tensors {sorted(header)}, expected {sorted(_TENSOR_NAMES)}")
    if len(raw) != 8 + header_len + data_len:
        raise problem(f"is {len(raw)} bytes but its header describes {8 + header_len + data_len} (truncated or torn)")
    try:
        tensors = safetensors.torch.load(raw)
    except Exception as e:  # safetensors raises its own error type for any malformed buffer
        raise problem(f"cannot be decoded ({e})") from e
    ids, start, end = (tensors[name] for name in _TENSOR_NAMES)
    if ids.dtype != torch.int64 or ids.dim() != 1 or start.dim() != 2 or start.shape != end.shape:
        raise problem(f"has feature_ids {ids.dtype} {tuple(ids.shape)}, start {tuple(start.shape)}, end {tuple(end.shape)}")
    if start.shape[0] != ids.numel() or start.dtype != end.dtype or start.dtype not in LOGIT_DTYPES.values():
        raise problem(f"logits {start.dtype}/{end.dtype} {tuple(start.shape)} do not fit {ids.numel()} feature ids")
    stored, computed = metadata.get("sha256"), _checksum(tensors)
    if stored != computed:
        raise problem(f"checksum mismatch (stored {str(stored)[:16]}..., computed {computed[:16]}...): the data is corrupted")
    if feature_ids is not None:
        expected = [int(i) for i in feature_ids]
        got = ids.tolist()
        if got != expected:
            first = next((r for r, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
            raise problem(
                f"holds {len(got)} feature ids where the plan has {len(expected)}; they differ first at row {first}"
                " (a shard of another plan or store)"
            )
    if dtype is not None and start.dtype != dtype:
        raise problem(f"logits are {start.dtype}, the store's manifest says {dtype}")
    return ShardData(ids, start, end)
