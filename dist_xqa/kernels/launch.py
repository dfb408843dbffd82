"""What the kernel launchers share with the ahead-of-time compile and the first-use self-check.

A launcher (kd.py, alignment.py) first builds its launches as `Launch` values (kernel, grid,
arguments, constexprs and warps), then runs them. Built from meta tensors, the same launches
tell dist_xqa.kernels.aot exactly which variants to compile for a GPU it does not have.

Triton compiles one variant of a kernel per distinct specialisation of its arguments: the
constexprs and warps, the dtype of each pointer, and two properties of each integer and
pointer, whether it is 1 (integers only) and whether it is divisible by 16 (pointers: 16-byte
aligned). `int_class` and `pointer_class` name those classes, so that a launcher can tell
the self-check (selfcheck.py) which variant a call will run, and the check is made once per
variant rather than once per kernel.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from torch import Tensor


class Launch(NamedTuple):
    kernel: Any  # a triton.jit function (or its interpreted form under TRITON_INTERPRET=1)
    grid: tuple[int, ...]
    args: tuple
    meta: dict  # constexprs and launch options (num_warps)

    def run(self) -> None:
        self.kernel[self.grid](*self.args, **self.meta)


def int_class(value: int) -> str:
    """Triton's specialisation of an integer argument: "1", "16" (divisible by 16) or "any"."""
    if value == 1:
        return "1"
    return "16" if value % 16 == 0 else "any"


def pointer_class(tensor: Tensor) -> str:
    """Triton's specialisation of a pointer, for a tensor the launcher passes through
    .contiguous(): a non-contiguous one is copied into a fresh (aligned) allocation."""
    aligned = not tensor.is_contiguous() or tensor.data_ptr() % 16 == 0
    return "aligned" if aligned else "unaligned"
