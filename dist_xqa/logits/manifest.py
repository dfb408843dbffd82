"""What a logit store was computed from, so that nobody uses logits of another run.

`manifest.json` in the store root records what the logits depend on, its key: the
distillation set (a hash of its feature ids, as a set), the tokenizer fingerprint, every
teacher's checkpoint hash, the logit dtype, the top-k of a compressed store (null: dense),
for self-distillation the teacher generation, and for the placebo control its seed. Never
the student: its seed, batch, world size and shard plan are not part of the key, so a store
serves every student of a sweep ("One teacher pass, many students", DESIGN.md section 2).

The manifest also fixes the store's layout: the shard plan (shard_size, seed) its files
are cut by, that of the first student that created it. A student with another plan
adopts the store's layout (prepare_store returns the store's manifest) and reads its
rows by feature id from the layout's shards (reader.py). Producers create or verify the
manifest before writing a shard; the student verifies it before using one.
"""
from __future__ import annotations

import fcntl
import hashlib
import re
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from dist_xqa.files import read_json, write_json
from dist_xqa.logits.order import ShardPlan
from dist_xqa.logits.shards import LOGIT_DTYPES

MANIFEST_NAME = "manifest.json"
_LOCK_NAME = ".lock"
_TEACHER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# A run's own store holds its teachers' logits: --redo teachers removes it, --redo distill
# keeps it while it matches, --redo store drops it (dist_xqa/stages.py).
RESET_ADVICE = ("to reset it, rerun the same command with --redo store (a store shared through distill.store_dir: "
                "remove it once no run reads it)")


class StoreMismatchError(RuntimeError):
    """The logit store was made for a different distillation set, tokenizer, teacher
    checkpoint, plan or generation than the one asking."""


def hash_features(feature_ids: Sequence[int]) -> str:
    """SHA-256 of the distillation set's feature ids, as a set (sorted)."""
    return hashlib.sha256(",".join(str(i) for i in sorted(int(i) for i in feature_ids)).encode()).hexdigest()


def hash_checkpoint(directory: str | Path) -> str:
    """SHA-256 over the model weight files directly in `directory` (Hugging Face layout:
    *.safetensors, *.bin, *.pt, *.pth), by name and content; other files (configs,
    tokenizer) do not change the teacher's logits' provenance here."""
    directory = Path(directory)
    weights = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in _WEIGHT_SUFFIXES) if directory.is_dir() else []
    if not weights:
        raise FileNotFoundError(f"{directory}: no model weight files ({', '.join(_WEIGHT_SUFFIXES)}) to hash")
    digest = hashlib.sha256()
    for path in weights:
        digest.update(f"{path.name}\0{path.stat().st_size}\0".encode())
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Manifest:
    features_hash: str
    tokenizer: str  # fingerprint of the tokenizer settings shared by teachers and student
    teachers: dict[str, str]  # teacher name -> checkpoint hash
    shard_size: int  # the layout: the shard plan the files are cut by (not part of the key)
    seed: int
    dtype: str = "float16"
    generation: int = 0  # teacher generation, for self-distillation
    topk: int | None = None  # logits kept per row (shards.py's top-k form); None: dense
    placebo: int | None = None  # distill.placebo_shuffle's seed: rows moved within each shard; None: real rows

    def __post_init__(self) -> None:
        if self.dtype not in LOGIT_DTYPES:
            raise ValueError(f"manifest dtype must be one of {sorted(LOGIT_DTYPES)}, got {self.dtype!r}")
        if self.topk is not None and (type(self.topk) is not int or self.topk < 1):
            raise ValueError(f"manifest topk must be null (dense) or an integer >= 1, got {self.topk!r}")
        if self.shard_size < 1:
            raise ValueError(f"manifest shard_size must be >= 1, got {self.shard_size}")
        if not self.teachers:
            raise ValueError("manifest names no teachers")
        for name in self.teachers:
            if not _TEACHER_NAME.fullmatch(name):
                raise ValueError(f"teacher name {name!r} cannot name a store directory (letters, digits, _ . - only)")

    @classmethod
    def for_plan(
        cls, plan: ShardPlan, tokenizer: str, teachers: dict[str, str], dtype: str = "float16", generation: int = 0,
        topk: int | None = None, placebo: int | None = None,
    ) -> Manifest:
        """The manifest of a store computed over `plan` (its layout, if it creates the store)."""
        return cls(hash_features(plan.feature_ids), tokenizer, dict(teachers), plan.shard_size, plan.seed, dtype,
                   generation, topk, placebo)

    def layout(self, plan: ShardPlan) -> ShardPlan:
        """The store's shard plan over `plan`'s features: the plan its files are cut by."""
        if (plan.shard_size, plan.seed) == (self.shard_size, self.seed):
            return plan
        return ShardPlan(plan.feature_ids, self.shard_size, self.seed)

    @property
    def torch_dtype(self) -> torch.dtype:
        return LOGIT_DTYPES[self.dtype]

    def check_plan(self, plan: ShardPlan) -> None:
        """Raises StoreMismatchError unless `plan` covers this manifest's features."""
        self.check_matches(Manifest.for_plan(plan, self.tokenizer, self.teachers, self.dtype, self.generation, self.topk,
                                             self.placebo), "the shard plan")

    def check_matches(self, other: Manifest, source: str = "the logit store") -> None:
        """Raises StoreMismatchError naming every part of the key in which `other` (found
        in `source`) differs from this (expected) manifest; the layout may differ."""
        if differences := self.differences(other):
            raise StoreMismatchError(f"{source} does not match this run: " + "; ".join(differences)
                                     + f" ({RESET_ADVICE})")

    def differences(self, other: Manifest) -> list[str]:
        """Every part of the key in which `other` differs from this (expected) manifest."""
        differences = []
        if other.features_hash != self.features_hash:
            differences.append(f"distillation set features (hash {other.features_hash[:12]} != expected {self.features_hash[:12]})")
        if other.tokenizer != self.tokenizer:
            differences.append(f"tokenizer ({other.tokenizer!r} != expected {self.tokenizer!r})")
        for name in sorted(self.teachers.keys() | other.teachers.keys()):
            if name not in other.teachers:
                differences.append(f"teacher {name!r} missing")
            elif name not in self.teachers:
                differences.append(f"teacher {name!r} not expected")
            elif other.teachers[name] != self.teachers[name]:
                differences.append(
                    f"teacher {name!r} checkpoint (hash {other.teachers[name][:12]} != expected {self.teachers[name][:12]})"
                )
        for name in ("dtype", "generation", "topk", "placebo"):
            if getattr(other, name) != getattr(self, name):
                differences.append(f"{name} ({getattr(other, name)!r} != expected {getattr(self, name)!r})")
        return differences

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: object, source: str) -> Manifest:
        names = {f.name for f in fields(cls)}
        if isinstance(data, dict):  # written before these keys existed: dense, real rows
            data = {"topk": None, "placebo": None, **data}
        if not isinstance(data, dict) or set(data) != names:
            keys = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise StoreMismatchError(f"{source}: expected keys {sorted(names)}, found {keys}")
        try:
            return cls(**data)
        except (TypeError, ValueError) as e:
            raise StoreMismatchError(f"{source}: {e}") from e


def read_manifest(store_dir: str | Path) -> Manifest | None:
    """The store's manifest, or None when it has none yet."""
    path = Path(store_dir) / MANIFEST_NAME
    try:
        data = read_json(path)
    except ValueError as e:
        raise StoreMismatchError(str(e)) from e
    return None if data is None else Manifest.from_json(data, str(path))


def prepare_store(store_dir: str | Path, manifest: Manifest, reset: bool = False) -> Manifest:
    """Makes `store_dir` a store for `manifest` and returns the store's manifest: creates
    it with `manifest`, accepts it when its key matches (returning the store's own, whose
    layout may differ), and otherwise raises StoreMismatchError or, with `reset`, wipes it
    and starts afresh. A file lock serialises the producers starting together (of one run
    or of several sharing the store), so exactly one of them creates or wipes it."""
    store = Path(store_dir)
    store.mkdir(parents=True, exist_ok=True)
    with locked(store):
        try:
            found = read_manifest(store)
            if found is not None:
                manifest.check_matches(found, f"logit store {store}")
                return found
            leftovers = sorted(p.name for p in store.iterdir() if p.name != _LOCK_NAME)
            if leftovers:
                raise StoreMismatchError(f"logit store {store} holds {leftovers[:5]} but no {MANIFEST_NAME} "
                                         f"({RESET_ADVICE})")
        except StoreMismatchError as e:
            if not reset:
                raise StoreMismatchError(f"refusing to write into it: {e}") from None
            _wipe(store)
        write_json(store / MANIFEST_NAME, manifest.to_json(), durable=True)
        return manifest


@contextmanager
def locked(directory: Path, name: str = _LOCK_NAME) -> Iterator[None]:
    """An exclusive lock (flock) on `directory`/`name`, between the processes sharing it."""
    with open(directory / name, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _wipe(store: Path) -> None:
    for path in store.iterdir():
        if path.name == _LOCK_NAME:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
