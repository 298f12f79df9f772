"""The torch ops a forward dispatches, counted: what a forward costs a GPU's host in kernel launches.

    with ops.counted() as count:
        model(**batch)
    count.kernels, count.views   # ops that compute or copy (a launch each on a GPU); views

Every aten op that reaches the dispatcher's Python key is counted once: as a view when its outputs
share storage with an input and it mutates nothing (view, transpose, slice, a `to` that changes
nothing: metadata only, no launch), else as a kernel. It times nothing, so it is exact on any
machine; `bench.costs.hostpath --ops` reports it per scenario beside the timings.
"""

from __future__ import annotations

import contextlib
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def _storages(values) -> set:
    return {t.untyped_storage().data_ptr() for t in tree_leaves(values) if isinstance(t, torch.Tensor)
            and t.device.type != "meta"}


class OpCount(TorchDispatchMode):
    """Counts dispatched ops by kind (`kernels`, `views`) and by name (`by_name`)."""

    def __init__(self):
        super().__init__()
        self.kernels = self.views = 0
        self.by_name: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        mutates = func._schema.is_mutable
        outputs = _storages(out)
        if not mutates and outputs and outputs <= _storages((args, kwargs)):
            self.views += 1
        else:
            self.kernels += 1
            self.by_name[str(func.overloadpacket.__name__)] += 1
        return out


@contextlib.contextmanager
def counted():
    """Inside, every dispatched op is counted (`OpCount`)."""
    with OpCount() as count:
        yield count
