"""TensorBoard scalars and progress bars. Only the designated rank of a role group
writes (its events file is named after the role, so concurrent groups never share one)."""
from __future__ import annotations

import time
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter


class Monitor:
    """Scalars under `<run>/tb/<role>/`; a no-op on ranks that do not write."""

    def __init__(self, run_dir: Path, role: str, enabled: bool):
        self.writer = SummaryWriter(str(Path(run_dir) / "tb" / role)) if enabled else None
        self._last = time.perf_counter()
        self._samples = 0

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, float(value), step)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.scalar(tag, value, step)

    def throughput(self, samples: int, step: int, every: int = 10) -> None:
        """samples_per_second, averaged over the last `every` steps."""
        self._samples += samples
        if step % every == 0:
            now = time.perf_counter()
            self.scalar("samples_per_second", self._samples / max(now - self._last, 1e-9), step)
            self._last, self._samples = now, 0

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
