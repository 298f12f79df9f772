"""An encoder's embeddings of the rows served whole: not computed.

The span's first block keeps only the rows that compute (`plan.Plan.compute`), and the last block
places the stored states of the others, so what the embeddings module computes for a served row
is never read. When no row of a batch computes (`plan.Plan.m` is 0), `Embeddings.forward` (the
module's forward while accelerated) returns zeros of the shape, dtype and device the module
returned the last time it ran under the same model state (`Call.switches`: autocast may change
its dtype): the model's own code around it (its mask helpers read the dtype and shape) runs as it
does, on a tensor no output depends on. On the CPU, where some rows compute and others are served,
the module runs on the computing rows only (its batch-major arguments sliced, as the blocks' are)
and their embeddings are placed in zeros of the batch's shape: there the arithmetic of the
served rows' embeddings is real time (about half a millisecond in a sentence-transformers request
of 32, bench/results/costs/padded-mixed-cpu.json), while on a GPU the same kernels run whatever
the rows and the slicing would only add launches. It computes as usual where a shape is not known
yet, where the module or a global hook would see its output, and on every other forward.

Only where the span starts at the first block and no semantic tier reads the forward (the
caller, `api._exact_tiers`, decides): blocks before the span would run on the zeros.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import module as _module

from ...splice import slice_rows
from .plan import Plan


def _hooked(module: nn.Module) -> bool:
    """A forward hook (the module's own or a global one) would see what the module returns."""
    return bool(module._forward_hooks or module._forward_pre_hooks or _module._global_forward_hooks
                or _module._global_forward_pre_hooks)


class Embeddings:
    """The spliced forward of an encoder's embeddings module (`module`, its own `forward`)."""

    def __init__(self, tier, module: nn.Module, forward):
        self.tier, self.module, self.original = tier, module, forward
        self.made: dict = {}  # switches -> (dtype, width, device) of the module's last output under them

    def clear(self) -> None:
        self.made.clear()

    @torch.compiler.disable
    def forward(self, *args, **kwargs):
        call = self.tier.owner.current()
        plan = call.route if call is not None else None
        if isinstance(plan, Plan) and not _hooked(self.module):
            if plan.m == 0:
                made = self.made.get(call.switches)
                if made is not None:
                    dtype, width, device = made
                    return torch.zeros((plan.batch, plan.seq, width), dtype=dtype, device=device)
            elif plan.compute is not None and plan.compute.device.type == "cpu":
                rows = plan.compute
                some = self.original(*slice_rows(args, rows, plan.batch, plan.sliced),
                                     **{k: slice_rows(v, rows, plan.batch, plan.sliced) for k, v in kwargs.items()})
                if isinstance(some, torch.Tensor) and some.dim() == 3 and some.shape[0] == plan.m:
                    out = some.new_zeros((plan.batch, *some.shape[1:]))
                    out.index_copy_(0, rows, some)
                    self.made[call.switches] = (out.dtype, out.shape[-1], out.device)
                    return out
        out = self.original(*args, **kwargs)
        if call is not None and isinstance(out, torch.Tensor) and out.dim() == 3:
            self.made[call.switches] = (out.dtype, out.shape[-1], out.device)
        return out
