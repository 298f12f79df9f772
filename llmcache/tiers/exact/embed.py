"""An encoder's embeddings on a forward whose every row is served whole: not computed.

When no row of a batch computes (every row served from the bank: `plan.Plan.m` is 0), the span's
first block drops its input and the last block returns the stored states, so what the embeddings
module computes is never read. `Embeddings.forward` (the module's forward while accelerated)
then returns zeros of the shape, dtype and device the module returned the last time it ran
under the same model state (`Call.switches`: autocast may change its dtype): the model's own
code around it (its mask helpers read the dtype and shape) runs as it does, on a tensor no
output depends on. It computes as usual where that is not known yet, where the module or a
global hook would see its output, and on every other forward.

Only where the span starts at the first block and no semantic tier reads the forward (the
caller, `api._exact_tiers`, decides): blocks before the span would run on the zeros.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import module as _module

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
        if isinstance(plan, Plan) and plan.m == 0 and not _hooked(self.module):
            made = self.made.get(call.switches)
            if made is not None:
                dtype, width, device = made
                return torch.zeros((plan.batch, plan.seq, width), dtype=dtype, device=device)
        out = self.original(*args, **kwargs)
        if call is not None and isinstance(out, torch.Tensor) and out.dim() == 3:
            self.made[call.switches] = (out.dtype, out.shape[-1], out.device)
        return out
