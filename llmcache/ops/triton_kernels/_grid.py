"""Launch-grid limits shared by the Triton launchers.

CUDA allows 2^31 - 1 programs on grid axis 0 but only 65,535 on axes 1 and 2. Launchers cap
each axis with `capped_grid` and their kernels walk the rest with grid-stride loops
(`for i in range(tl.program_id(a), n, tl.num_programs(a))`), so no shape can overflow a launch.
Tests pass a small `max_grid` to the launchers to run those loops on small inputs.
"""

from __future__ import annotations

import triton

MAX_GRID = (2**31 - 1, 65535, 65535)


def capped_grid(sizes: tuple[int, ...], max_grid: tuple[int, ...] = MAX_GRID) -> tuple[int, ...]:
    """Programs per axis: `sizes` (work items per axis) capped at `max_grid`, at least one each."""
    return tuple(max(1, min(size, limit)) for size, limit in zip(sizes, max_grid))


def interpreted(kernel) -> bool:
    """True when `kernel` runs under TRITON_INTERPRET=1 (decided when the module was imported)."""
    return not isinstance(kernel, triton.runtime.JITFunction)
