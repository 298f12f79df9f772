"""Claims on pages being computed (`Shared.wait`), on a real redis-server: a replica whose pages
another replica is computing waits for them and serves them from Redis; a claim whose holder never
writes expires after `wait` and the waiter computes; a replica without `wait` never claims."""

from __future__ import annotations

import copy
import threading
import time

import pytest
import torch
from helpers import PREFIX_TOLERANCE, assert_outputs
from test_shared_pages import PAGE, ids, logits, plain, replica

import llmcache

pytest.importorskip("redis")


def _held(model, started: threading.Event, release, fail: bool = False) -> None:
    """`model`'s first block signals `started`, then holds its forward until `release()` is true
    (at most 30 s); with `fail`, the forward then raises."""
    def hook(*_):
        started.set()
        deadline = time.monotonic() + 30
        while not release() and time.monotonic() < deadline:
            time.sleep(0.005)
        if fail:
            raise RuntimeError("the replica died mid-forward")
    model.model.layers[0].register_forward_pre_hook(hook)


def _in_thread(fn) -> tuple[threading.Thread, dict]:
    out = {}

    def run():
        try:
            out["value"] = fn()
        except RuntimeError as err:
            out["error"] = err

    worker = threading.Thread(target=run)
    worker.start()
    return worker, out


def test_a_replica_waits_for_the_pages_another_is_computing(redis_server):
    ref = plain()
    a = replica(redis_server.url, copy.deepcopy(ref), wait=30.0)
    b = replica(redis_server.url, copy.deepcopy(ref), wait=30.0)
    prompt, turn = ids(40, 1), torch.cat([ids(40, 1), ids(3, 2)])
    started, since = threading.Event(), []
    # a claims its pages at routing and then computes for three seconds (its first block held): b,
    # routed meanwhile, finds the claim on its chain's first page and waits for a's pages.
    _held(a, started, release=lambda: since and time.monotonic() - since[0] > 3.0)
    worker, out = _in_thread(lambda: logits(a, prompt))
    assert started.wait(30)
    since.append(time.monotonic())
    got = logits(b, turn)
    worker.join(30)
    assert_outputs(got, logits(ref, turn), tolerance=PREFIX_TOLERANCE)
    assert_outputs(out["value"], logits(ref, prompt), tolerance=0.0)
    sa, sb = llmcache.stats(a), llmcache.stats(b)
    assert sa.shared.claims == 1 and sa.shared.waits == 0
    assert sb.shared.waits == 1 and sb.shared.claims == 0
    assert sb.last_tokens == (5 * PAGE, 3) and sb.shared.tokens_served == 5 * PAGE
    assert llmcache.flush(a) and redis_server.client().keys("*:claim") == []  # (written pages end their claims)


def test_a_claim_whose_holder_never_writes_expires_and_the_waiter_computes(redis_server):
    ref = plain()
    a = replica(redis_server.url, copy.deepcopy(ref), wait=2.0)
    b = replica(redis_server.url, copy.deepcopy(ref), wait=2.0)
    prompt = ids(40, 3)
    started, go = threading.Event(), threading.Event()
    _held(a, started, release=go.is_set, fail=True)
    worker, out = _in_thread(lambda: logits(a, prompt))
    assert started.wait(30)
    go.set()
    worker.join(30)
    assert "error" in out and redis_server.client().keys("*:claim")  # a died holding its claim
    assert_outputs(logits(b, prompt), logits(ref, prompt), tolerance=PREFIX_TOLERANCE)
    s = llmcache.stats(b)
    assert s.shared.waits == 1 and s.shared.tokens_served == 0 and s.last_tokens == (0, 40)


def test_without_wait_no_replica_claims(redis_server):
    a = replica(redis_server.url)
    logits(a, ids(40, 4))
    assert llmcache.flush(a)
    assert llmcache.stats(a).shared.claims == 0 and redis_server.client().keys("*:claim") == []
