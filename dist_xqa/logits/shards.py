"""One teacher's start/end logits for one shard: a self-checking safetensors file.

Layout: `<store>/<teacher>/shard_<index:06d>.safetensors` holding the tensors
`feature_ids` (int64 [S]), `start` and `end` (float16 or bfloat16 [S, L]); the metadata
holds the format tag and the SHA-256 of the three tensors' bytes (in that order), so a
flipped byte anywhere in the data, or a header that no longer describes it, is caught.

Top-k form (`distill.store_topk: k`, TOPK_SHARD_FORMAT): each row keeps its k largest
logits among the positions that may hold an answer, `<part>_values` ([S, k], the logits'
dtype) at `<part>_indices` ([S, k] int16; -1 marks an empty slot, in rows with fewer than k
valid positions), and `<part>_rest` ([S] float32), the log-sum-exp of the valid positions
left out, so the softmax mass is kept; the metadata adds the row length L. 4k + 4 bytes per
row in float16 instead of 2L (L = 384, k = 16: 68 instead of 768). The student turns it back
into dense logits on its device (dense_logits), spreading the left-out mass uniformly over
the left-out valid positions, as explained there.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import safetensors.torch
import torch

from dist_xqa.files import atomic_write

SHARD_FORMAT = "dist_xqa.logit_shard.v1"
TOPK_SHARD_FORMAT = "dist_xqa.logit_shard.topk.v1"
LOGIT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
_TENSOR_NAMES = {  # by format, in checksum order
    SHARD_FORMAT: ("feature_ids", "start", "end"),
    TOPK_SHARD_FORMAT: ("feature_ids", *(f"{part}_{field}" for part in ("start", "end")
                                         for field in ("values", "indices", "rest"))),
}
_EMPTY_SLOT = -1
# The reconstructed logit of positions that take no mass (outside the mask, or rows with
# nothing left out): finite, so that exp(x - max) * (x - max) is 0 and never 0 * inf = NaN,
# and far enough below any real logit that its probability is 0 in float32.
_NO_MASS = -1.0e4
_SHARD_NAME = re.compile(r"shard_(\d{6,})\.safetensors")


class ShardError(RuntimeError):
    """A shard file that is torn, corrupted, or not the shard it was asked for."""


@dataclass(frozen=True)
class TopKLogits:
    """Logit rows [..., L] in top-k form (see the module docstring): `values` [..., k],
    `indices` [..., k] int16 (-1: empty slot), `rest` [...] float32 (-inf: nothing left out)."""

    values: torch.Tensor
    indices: torch.Tensor
    rest: torch.Tensor
    length: int  # L

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the dense rows it stands for: [..., L]."""
        return (*self.rest.shape, self.length)

    def __getitem__(self, rows) -> TopKLogits:
        """Selects rows: `rows` indexes the leading dimensions only ([K, S] for a shard)."""
        return TopKLogits(self.values[rows], self.indices[rows], self.rest[rows], self.length)


Logits = torch.Tensor | TopKLogits


@dataclass(frozen=True)
class ShardData:
    feature_ids: torch.Tensor  # int64 [S]
    start: Logits  # [S, L], dense or top-k
    end: Logits


def compress_topk(logits: torch.Tensor, mask: torch.Tensor, k: int) -> TopKLogits:
    """Top-k form of logit rows [..., L] (float32 arithmetic): the k largest logits at
    positions where the bool `mask` [..., L] is True, and the log-sum-exp of the valid
    positions left out. A row with fewer than k valid positions keeps them all."""
    length = logits.shape[-1]
    if mask.shape != logits.shape or mask.dtype != torch.bool:
        raise ValueError(f"top-k: mask must be bool {tuple(logits.shape)}, got {mask.dtype} {tuple(mask.shape)}")
    if not 1 <= length <= torch.iinfo(torch.int16).max or k < 1:
        raise ValueError(f"top-k: need k >= 1 and 1 <= L <= 32767 (int16 positions), got k = {k}, L = {length}")
    x = logits.float().masked_fill(~mask, float("-inf"))
    values, indices = x.topk(min(k, length), dim=-1)
    kept = mask.gather(-1, indices)
    rest = x.scatter(-1, indices, float("-inf")).logsumexp(-1)
    values = torch.where(kept, values, 0.0)
    indices = torch.where(kept, indices, _EMPTY_SLOT)
    if k > length:
        pad = (*values.shape[:-1], k - length)
        values = torch.cat([values, values.new_zeros(pad)], -1)
        indices = torch.cat([indices, indices.new_full(pad, _EMPTY_SLOT)], -1)
    return TopKLogits(values, indices.to(torch.int16), rest, length)


def dense_logits(logits: Logits, mask: torch.Tensor) -> torch.Tensor:
    """Teacher logits [..., L] as float32 on `mask`'s device, for the KD loss and the imp
    entropy; `mask` [..., L] is the positions mask of the rows (broadcast over teachers).

    Dense logits are only moved. Top-k logits are moved in that form (4k + 4 bytes a row)
    and reconstructed on the device: kept positions get their logit, and every left-out
    position rest - log(n), n the row's valid positions left out, so the softmax over the
    mask is the compressed distribution exactly (the kept probabilities, and the left-out
    mass spread evenly). The KD loss, the imp entropy and the fused kernel then run on the
    reconstruction unchanged, so both see the same distribution.

    Why spread the mass rather than keep it as one bucket: the teachers are aggregated in
    logit space, z = sum_k w_k z^k, and their top-k sets differ, so every teacher needs a
    logit at every position; and the student's KD term needs a teacher probability at each
    of its positions. Spreading is also the most uncertain completion consistent with what
    is kept (rest - log n never exceeds the k-th kept logit, so no left-out position
    overtakes a kept one); the imp entropy it gives is the largest the kept values allow,
    and the deviation from dense is measured in benchmarks/topk.py.
    """
    if isinstance(logits, torch.Tensor):
        return logits.to(mask.device, torch.float32)
    device = mask.device
    indices = logits.indices.to(device, torch.int64)
    kept = indices != _EMPTY_SLOT
    left_out = mask.sum(-1) - kept.sum(-1)  # [..., ] valid positions not kept
    rest = logits.rest.to(device, torch.float32)
    spread = rest - torch.log(left_out.clamp(min=1).float())
    spread = torch.where((left_out > 0) & torch.isfinite(spread), spread, _NO_MASS)
    # One column past the end receives the empty slots' writes and is dropped.
    dense = spread[..., None].expand(*spread.shape, logits.length + 1).clone()
    dense.scatter_(-1, torch.where(kept, indices, logits.length), logits.values.to(device, torch.float32))
    return dense[..., : logits.length]


def stack_logits(items: Sequence[Logits]) -> Logits:
    """Stacks K teachers' [S, L] logits of one shard into [K, S, L], dense or top-k."""
    if all(isinstance(x, torch.Tensor) for x in items):
        return torch.stack(list(items))
    return TopKLogits(torch.stack([x.values for x in items]), torch.stack([x.indices for x in items]),
                      torch.stack([x.rest for x in items]), items[0].length)


def gather_rows(parts: Sequence[ShardData], feature_ids: Sequence[int]) -> ShardData:
    """The rows of `feature_ids`, in that order, from shards `parts` that hold them all
    (a part that is exactly those rows is returned as it is)."""
    ids = torch.as_tensor([int(f) for f in feature_ids], dtype=torch.int64)
    if len(parts) == 1 and torch.equal(parts[0].feature_ids, ids):
        return parts[0]
    every = torch.cat([p.feature_ids for p in parts])
    order = torch.argsort(every)
    rows = order[torch.searchsorted(every[order], ids)]

    def cat(items: Sequence[Logits]) -> Logits:
        if isinstance(items[0], torch.Tensor):
            return torch.cat(list(items))[rows]
        return TopKLogits(*(torch.cat([getattr(x, f) for x in items])[rows] for f in ("values", "indices", "rest")),
                          items[0].length)

    return ShardData(ids, cat([p.start for p in parts]), cat([p.end for p in parts]))


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


def _checksum(tensors: dict[str, torch.Tensor], form: str, length: str = "") -> str:
    digest = hashlib.sha256()
    for name in _TENSOR_NAMES[form]:
        digest.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    digest.update(length.encode())  # top-k only: the row length is data too
    return digest.hexdigest()


def _topk_part(tensors: dict[str, torch.Tensor], part: str, length: str,
               problem: Callable[[str], ShardError]) -> TopKLogits:
    """The top-k form of `part` ("start" or "end") among a shard file's tensors, its layout checked."""
    if not length.isdigit():
        raise problem(f"metadata length is {length!r}, expected the row length L")
    x = TopKLogits(*(tensors[f"{part}_{field}"] for field in ("values", "indices", "rest")), int(length))
    if (x.values.dim() != 2 or x.indices.shape != x.values.shape or x.indices.dtype != torch.int16
            or x.rest.dtype != torch.float32 or x.rest.shape != x.values.shape[:1]):
        raise problem(f"has {part} top-k values {x.values.dtype} {tuple(x.values.shape)}, indices {x.indices.dtype} "
                      f"{tuple(x.indices.shape)}, rest {x.rest.dtype} {tuple(x.rest.shape)}")
    if ((x.indices < _EMPTY_SLOT) | (x.indices >= x.length)).any():
        raise problem(f"has {part} top-k positions outside [0, {x.length})")
    return x


def _describe(topk: int | None) -> str:
    return "dense" if topk is None else f"top-{topk}"


def write_shard(
    path: str | Path,
    feature_ids: Sequence[int] | torch.Tensor,
    start: Logits,
    end: Logits,
    dtype: torch.dtype = torch.float16,
) -> int:
    """Commits one shard file atomically (temporary name, fsync, rename) with the logits
    (dense [S, L], or both TopKLogits: the top-k form) cast to `dtype`; returns its size in bytes."""
    path = Path(path)
    if dtype not in LOGIT_DTYPES.values():
        raise ValueError(f"{path}: logits dtype must be float16 or bfloat16, got {dtype}")
    ids = torch.as_tensor(feature_ids, dtype=torch.int64).flatten()
    topk = isinstance(start, TopKLogits)
    if (topk != isinstance(end, TopKLogits) or len(start.shape) != 2 or start.shape != end.shape
            or start.shape[0] != ids.numel() or ids.numel() == 0
            or topk and not start.values.shape == start.indices.shape == end.values.shape == end.indices.shape):
        raise ValueError(
            f"{path}: expected start and end logits of shape [S, L] (both dense or both top-k) with S = "
            f"{ids.numel()} feature ids, got start {tuple(start.shape)} and end {tuple(end.shape)}"
        )
    tensors = {"feature_ids": ids.contiguous()}
    if topk:
        form, length = TOPK_SHARD_FORMAT, str(start.length)
        for part, x in (("start", start), ("end", end)):
            tensors[f"{part}_values"] = x.values.detach().to("cpu", dtype).contiguous()
            tensors[f"{part}_indices"] = x.indices.to("cpu", torch.int16).contiguous()
            tensors[f"{part}_rest"] = x.rest.detach().to("cpu", torch.float32).contiguous()
    else:
        form, length = SHARD_FORMAT, ""
        tensors["start"] = start.detach().to("cpu", dtype).contiguous()
        tensors["end"] = end.detach().to("cpu", dtype).contiguous()
    metadata = {"format": form, "sha256": _checksum(tensors, form, length)}
    if topk:
        metadata["length"] = length
    data = safetensors.torch.save(tensors, metadata=metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data, durable=True)
    return len(data)


def read_shard(
    path: str | Path,
    feature_ids: Sequence[int] | None = None,
    dtype: torch.dtype | None = None,
    topk: int | None | Literal["any"] = "any",
) -> ShardData:
    """Reads and verifies one shard file: header, sizes, checksum, and, when given, that it
    holds exactly `feature_ids` (in order) with logits of `dtype`, in the form `topk` says
    (None: dense; k: top-k; "any": either). Anything wrong raises ShardError naming the
    file and the problem; no data is returned from a bad file."""
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
    form = metadata.get("format")
    if form not in _TENSOR_NAMES:
        raise problem(f"metadata format is {form!r}, expected one of {sorted(_TENSOR_NAMES)}")
    if sorted(header) != sorted(_TENSOR_NAMES[form]):
        raise problem(f"holds tensors {sorted(header)}, expected {sorted(_TENSOR_NAMES[form])}")
    if len(raw) != 8 + header_len + data_len:
        raise problem(f"is {len(raw)} bytes but its header describes {8 + header_len + data_len} (truncated or torn)")
    try:
        tensors = safetensors.torch.load(raw)
    except Exception as e:  # safetensors raises its own error type for any malformed buffer
        raise problem(f"cannot be decoded ({e})") from e
    if form == SHARD_FORMAT:
        ids, start, end = (tensors[name] for name in _TENSOR_NAMES[form])
        values, length = (start, end), ""
    else:
        ids, length = tensors["feature_ids"], str(metadata.get("length", ""))
        start, end = (_topk_part(tensors, part, length, problem) for part in ("start", "end"))
        values = (start.values, end.values)
    if ids.dtype != torch.int64 or ids.dim() != 1 or values[0].dim() != 2 or values[0].shape != values[1].shape:
        raise problem(f"has feature_ids {ids.dtype} {tuple(ids.shape)}, start {tuple(values[0].shape)}, end {tuple(values[1].shape)}")
    if (values[0].shape[0] != ids.numel() or values[0].dtype != values[1].dtype
            or values[0].dtype not in LOGIT_DTYPES.values()):
        raise problem(f"logits {values[0].dtype}/{values[1].dtype} {tuple(values[0].shape)} do not fit {ids.numel()} feature ids")
    stored, computed = metadata.get("sha256"), _checksum(tensors, form, length)
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
    if dtype is not None and values[0].dtype != dtype:
        raise problem(f"logits are {values[0].dtype}, the store's manifest says {dtype}")
    found = None if form == SHARD_FORMAT else values[0].shape[1]
    if topk != "any" and found != topk:
        raise problem(f"holds {_describe(found)} logits, the store's manifest says {_describe(topk)}")
    return ShardData(ids, start, end)
