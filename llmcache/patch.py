"""How `accelerate` points a module's forward at the cache, and what copies and tracers see of it.

Every module the cache patches (the base model, each cached block, and where the semantic tiers
read them the input embedding and the accelerated wrapper) gets one instance attribute,
`forward`, holding a `Patch` (a decoder's wrapper also `generate`, so that the pages its decode
steps computed are stored when it returns): weights, state_dict and module tree stay untouched,
and `disable` removes exactly these attributes.

- **Tracers record the model, not the cache.** Under `torch.export`, `torch.jit.trace` and
  `torch.fx` symbolic tracing a `Patch` calls the module's own forward, so an exported or traced
  program is the model's (the cache's host-side routing cannot be traced, and a traced lookup
  would freeze one batch's hits into the graph). `torch.compile` still runs the cache: its
  bookkeeping runs eagerly (`torch.compiler.disable`, a graph break per cached block) and the
  model's own code compiles; with `fullgraph=True`, which allows no break (generate compiles
  so for a static cache), the cache steps aside as for export.
- **A copy is a plain model.** `copy.deepcopy`, `pickle` and `torch.save` of an accelerated
  model give a model without the cache: a `Patch` reduces to the module's own forward and the
  cache object to None, so the copy never shares (or holds) the original's entries, and loading
  a pickle needs no llmcache. `llmcache.accelerate(copy)` gives it a cache of its own.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn
from torch.fx import _symbolic_trace

_FX_TRACING = _symbolic_trace._is_fx_tracing_tls  # (what torch.fx's is_fx_tracing reads)


@torch._dynamo.assume_constant_result
def _one_graph() -> bool:
    """Inside torch.compile, while dynamo traces: whether the frame may not break
    (`fullgraph=True`). Dynamo runs this at trace time (its result is a constant of the graph);
    it reads dynamo's own translator, so a torch without one answers False."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        return bool(InstructionTranslator.current_tx().one_graph)
    except Exception:  # noqa: BLE001 (another torch's internals: then graph breaks are allowed)
        return False


def tracing() -> bool:
    """True while torch.export, torch.jit.trace, torch.fx or a fullgraph torch.compile records a
    program. (Called on every patched forward, blocks included: the flags are read directly, not
    through the public helpers, which cost ten times as much; under torch.compile, which dynamo
    folds to a constant, only an export or a fullgraph compile records.)"""
    if torch.compiler.is_compiling():
        return torch.compiler.is_exporting() or _one_graph()
    return torch.compiler._is_exporting_flag or torch._C._is_tracing() or _FX_TRACING.__dict__.get("flag", False)


class Patch:
    """`module.forward` while accelerated: `cached(*args, **kwargs)`, or, while a tracer records,
    `original(*args, **kwargs)` (the forward the module had before). `owner` is the cache."""

    def __init__(self, module: nn.Module, original: Callable, cached: Callable, owner, name: str = "forward"):
        self.module, self.original, self.cached, self.owner, self.name = module, original, cached, owner, name
        functools.update_wrapper(self, original)  # inspect.signature(module.forward) stays the model's
        if hasattr(original, "__code__"):  # (torch.export reads the forward's code object for its argument names)
            self.__code__ = original.__code__

    def __call__(self, *args, **kwargs):
        if tracing():
            return self.original(*args, **kwargs)
        return self.cached(*args, **kwargs)

    def __reduce__(self):
        # A copy (deepcopy, pickle) of the module gets its own class's forward: at the time this
        # is called while loading, the new module's __dict__ is still empty.
        return getattr, (self.module, self.name)


def patch(module: nn.Module, cached: Callable, owner, name: str = "forward") -> nn.Module:
    """Point `module.<name>` (its forward) at `cached` (`unpatch` undoes it); returns the module."""
    setattr(module, name, Patch(module, getattr(module, name), cached, owner, name))
    return module


def unpatch(module: nn.Module) -> None:
    """Remove every `Patch` the cache put on `module`."""
    for name in [name for name, value in vars(module).items() if isinstance(value, Patch)]:
        delattr(module, name)


def patched(module: nn.Module) -> Patch | None:
    """The cache's patch on `module.forward`, or None."""
    forward = vars(module).get("forward")
    return forward if isinstance(forward, Patch) else None


__all__ = ["Patch", "patch", "patched", "tracing", "unpatch"]
