"""Which features each shard holds, and in which order the student reads the shards.

Positions are counted two ways: (epoch, position) within one epoch's order, and a global
index g = epoch * len(plan) + position over the whole run. Producers, the student and the
clean-up all compare global indices.
"""
from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence


class ShardPlan:
    """The distillation set cut into fixed shards plus a seeded shard order per epoch.

    Shard s is a fixed slice of the features in one seeded order, the same in every epoch,
    so a shard file stays valid for the whole run. Epoch e reads every shard once, in a
    permutation seeded by (seed, e), so a resumed student reads exactly the shards it
    would have read. The contents depend on the set of feature ids, not on the order they
    are given in: every run over the same features with the same (shard_size, seed) cuts
    the same shards (a logit store's layout, manifest.py, is such a plan).
    """

    def __init__(self, feature_ids: Sequence[int], shard_size: int, seed: int):
        ids = [int(i) for i in feature_ids]
        if not ids:
            raise ValueError("ShardPlan: the distillation set has no features")
        if shard_size < 1:
            raise ValueError(f"ShardPlan: shard_size must be >= 1, got {shard_size}")
        repeated = [i for i, count in Counter(ids).items() if count > 1]
        if repeated:
            raise ValueError(f"ShardPlan: feature ids occur more than once: {sorted(repeated)[:10]}")
        self.feature_ids: tuple[int, ...] = tuple(sorted(ids))
        self.shard_size = shard_size
        self.seed = seed
        # String seeds are hashed with SHA-512 by `random`, so the order is the same on
        # every machine and Python version.
        contents = list(self.feature_ids)
        random.Random(f"dist_xqa.shard_contents:{seed}").shuffle(contents)
        self._shards = [tuple(contents[i : i + shard_size]) for i in range(0, len(contents), shard_size)]
        self._orders: dict[int, tuple[list[int], list[int]]] = {}

    def __len__(self) -> int:
        return len(self._shards)

    def features(self, shard: int) -> list[int]:
        """The feature ids of `shard`, in the order its logit rows are stored."""
        if not 0 <= shard < len(self._shards):
            raise IndexError(f"shard {shard} is not in the plan (it has {len(self._shards)} shards)")
        return list(self._shards[shard])

    def order(self, epoch: int) -> list[int]:
        """The shard indices in the order the student reads them in `epoch`."""
        return list(self._order_and_positions(epoch)[0])

    def _order_and_positions(self, epoch: int) -> tuple[list[int], list[int]]:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if epoch not in self._orders:
            order = list(range(len(self._shards)))
            random.Random(f"dist_xqa.shard_order:{self.seed}:{epoch}").shuffle(order)
            positions = [0] * len(order)
            for position, shard in enumerate(order):
                positions[shard] = position
            self._orders[epoch] = (order, positions)
        return self._orders[epoch]

    def global_index(self, epoch: int, position: int) -> int:
        """The run-wide index of `position` in `epoch`; position == len(plan) is the end
        of the epoch (the same point as position 0 of the next)."""
        if epoch < 0 or not 0 <= position <= len(self):
            raise ValueError(f"(epoch {epoch}, position {position}) is outside the plan's {len(self)} positions per epoch")
        return epoch * len(self) + position

    def locate(self, index: int) -> tuple[int, int]:
        """(epoch, position) of a run-wide index."""
        return divmod(index, len(self))

    def shard_at(self, index: int) -> int:
        """The shard read at run-wide index `index`."""
        epoch, position = self.locate(index)
        return self._order_and_positions(epoch)[0][position]

    def next_use(self, shard: int, index: int) -> int:
        """The first run-wide index >= `index` at which `shard` is read. Every shard is read
        once per epoch, so it is in this epoch or the next."""
        epoch, position = self.locate(index)
        own = self._order_and_positions(epoch)[1][shard]
        if own >= position:
            return epoch * len(self) + own
        return (epoch + 1) * len(self) + self._order_and_positions(epoch + 1)[1][shard]


def rank_rows(num_rows: int, rank: int, world_size: int) -> slice:
    """The rows of one shard that data-parallel `rank` of `world_size` takes: contiguous,
    disjoint, covering all rows, sizes differing by at most one (lower ranks get the
    extra rows). Slice feature ids and logits ([K, S, L] on dim 1) with it."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a data-parallel world of {world_size}")
    base, extra = divmod(num_rows, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))
