"""With LLMCACHE_PEER=1, every model a test builds is accelerated, as a user would do it.

A model built with `Model(config)` is accelerated when its outermost constructor returns (a
model built inside another, LlamaModel inside LlamaForCausalLM, is part of the outer one), and
one loaded with `from_pretrained` when that returns. Everything the test does after that (moves,
dtype casts, train mode, weights edits, copies, saves, compile, export) meets the cache.
LLMCACHE_PEER_PADDING sets `padding`; LLMCACHE_PEER_STATS names a JSON file that gets what the
caches of the session's models counted, summed (so a run shows that the cache served rows).
"""

from __future__ import annotations

import json
import os
import threading
from collections import Counter

import pytest

MODELS = tuple(f"{family}{head}" for family in ("Bert", "Roberta", "DistilBert")
               for head in ("Model", "ForMaskedLM", "ForSequenceClassification")) + (
    "GPT2Model", "GPT2LMHeadModel", "LlamaModel", "LlamaForCausalLM", "LlamaForSequenceClassification")
_accelerated: list = []  # the models accelerated in the running test (kept until its teardown counts them)
_counts: Counter = Counter()


def _accelerate_every_model(**overrides) -> None:
    import transformers

    import llmcache

    depth = threading.local()

    def level() -> int:
        return getattr(depth, "n", 0)

    def accelerate(model) -> None:
        llmcache.accelerate(model, **overrides)
        _accelerated.append(model)

    def construct(cls, init):
        def __init__(self, *args, **kwargs):
            depth.n = level() + 1
            try:
                init(self, *args, **kwargs)
            finally:
                depth.n -= 1
            if level() == 0 and type(self) is cls:
                accelerate(self)
        return __init__

    loader = transformers.PreTrainedModel.from_pretrained.__func__

    def from_pretrained(klass, *args, **kwargs):
        depth.n = level() + 1
        try:
            model = loader(klass, *args, **kwargs)
        finally:
            depth.n -= 1
        loaded = model[0] if isinstance(model, tuple) else model  # (output_loading_info=True: (model, info))
        if level() == 0 and not llmcache.is_accelerated(loaded):
            accelerate(loaded)
        return model

    transformers.PreTrainedModel.from_pretrained = classmethod(from_pretrained)
    for name in MODELS:
        cls = getattr(transformers, name)
        cls.__init__ = construct(cls, cls.__init__)


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("LLMCACHE_PEER") == "1":
        padding = os.environ.get("LLMCACHE_PEER_PADDING")
        _accelerate_every_model(**({"padding": padding} if padding else {}))


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item) -> None:
    import llmcache

    for model in _accelerated:
        _counts["models"] += 1
        if not llmcache.is_accelerated(model):
            continue  # (the test disabled it: its counts went with it)
        s = llmcache.stats(model)
        _counts.update({k: getattr(s, k) for k in ("forwards", "rows", "hits", "repeats", "insertions", "invalidations")})
        _counts.update({f"not_cached:{k}": v for k, v in s.not_cached.items()})
    _accelerated.clear()


def pytest_sessionfinish(session: pytest.Session) -> None:
    path = os.environ.get("LLMCACHE_PEER_STATS")
    if path and os.environ.get("LLMCACHE_PEER") == "1":
        with open(path, "w") as f:
            json.dump(dict(sorted(_counts.items())), f, indent=1)
