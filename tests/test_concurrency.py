"""Several threads on one accelerated model: the same outputs as one thread, consistent banks."""

from __future__ import annotations

import threading

import torch
from helpers import batch
from models import output, tiny_model

import llmcache


def test_threads_get_single_thread_outputs(gen):
    model = tiny_model("bert")
    work = [[batch("bert", [7, 5, 7, 3], gen) for _ in range(3)] for _ in range(4)]
    with torch.inference_mode():
        want = [[output(model, b) for b in thread] for thread in work]
    llmcache.accelerate(model, capacity=40)  # < 48 distinct rows: inserts evict while others read
    got = [[None] * 3 for _ in work]
    errors = []

    def run(t):
        try:
            with torch.inference_mode(), llmcache.namespace(f"tenant-{t % 2}"):
                for _ in range(2):
                    for i, b in enumerate(work[t]):
                        for _ in range(2):  # back to back: the second call finds the first's entries
                            got[t][i] = output(model, b)
        except Exception as err:  # noqa: BLE001 - any failure in a thread is reported by the assert below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(t,)) for t in range(len(work))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    for t, thread in enumerate(work):
        for i, b in enumerate(thread):
            m = b["attention_mask"].bool()
            # Concurrent calls may take other GEMM paths (OpenMP threads are shared), so the last
            # bits can differ even uncached; a wrongly served entry would differ in every digit.
            torch.testing.assert_close(got[t][i][m], want[t][i][m], rtol=1e-5, atol=1e-5)
    st = llmcache.stats(model)
    assert st.evictions >= 48 - 40  # 48 distinct rows, each stored at least once, in 40 entries
    assert st.rows == 4 * 2 * 3 * 2 * 4 and st.not_cached == {}
    held = llmcache.held(model).entries
    keys = [(e.ids, e.positions, e.token_types, e.namespace) for e in held]
    assert len(keys) == len(set(keys))  # no entry stored twice
    assert len(held) == st.entries <= 40
    assert {e.namespace for e in held} <= {"tenant-0", "tenant-1"}
    assert st.bytes == sum(e.bytes for e in held) <= st.bytes_reserved
    # Which rows hit under the threads depends on how they interleaved; on one thread it is certain.
    with torch.inference_mode(), llmcache.namespace("tenant-0"):
        output(model, work[0][0])
        before = llmcache.stats(model).hits
        m = work[0][0]["attention_mask"].bool()
        torch.testing.assert_close(output(model, work[0][0])[m], want[0][0][m], rtol=1e-5, atol=1e-5)
    assert llmcache.stats(model).hits - before == 4


def test_semantic_tier_threads_get_single_thread_outputs(gen):
    model = tiny_model("bert")
    work = [[batch("bert", [7, 5, 7, 3], gen) for _ in range(2)] for _ in range(3)]
    with torch.inference_mode():
        want = [[output(model, b) for b in thread] for thread in work]
    # threshold 1.0: only identical fingerprints reuse, so every output stays the uncached one.
    llmcache.accelerate(model, layerwise=llmcache.Layerwise(threshold=1.0), capacity=16)
    errors = []

    def run(t):
        try:
            with torch.inference_mode():
                for _ in range(3):
                    for i, b in enumerate(work[t]):
                        m = b["attention_mask"].bool()
                        torch.testing.assert_close(output(model, b)[m], want[t][i][m], rtol=1e-5, atol=1e-5)
        except Exception as err:  # noqa: BLE001 - any failure in a thread is reported by the assert below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(t,)) for t in range(len(work))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    assert all(n <= 16 for n in llmcache.held(model).layers.values())
    with torch.inference_mode():  # on one thread a repeat hits in every layer, whatever the threads left
        output(model, work[0][0])
        before = [s.hits for s in llmcache.stats(model).layers]
        output(model, work[0][0])
    assert [s.hits - b for s, b in zip(llmcache.stats(model).layers, before)] == [4] * len(before)


def test_namespaces_hold_across_asyncio_tasks_and_executors(gen):
    """Tasks on one event loop thread, interleaving inside and outside namespaces: a task sees only
    the namespace it entered, never one another task entered while it was suspended; a call sent
    to a worker thread with asyncio.to_thread carries its caller's namespace."""
    import asyncio

    model = llmcache.accelerate(tiny_model("bert"))
    inputs = batch("bert", [5, 6], gen)

    def forward() -> None:
        with torch.inference_mode():
            output(model, inputs)

    async def tenant(entered: asyncio.Event, resume: asyncio.Event) -> None:
        with llmcache.namespace("tenant-a"):
            entered.set()
            await resume.wait()  # suspended inside its namespace while the outsider runs
            forward()

    async def outsider(entered: asyncio.Event, resume: asyncio.Event) -> None:
        await entered.wait()
        forward()  # outside any namespace, while the tenant is suspended inside one
        resume.set()

    async def main():
        entered, resume = asyncio.Event(), asyncio.Event()
        await asyncio.gather(tenant(entered, resume), outsider(entered, resume))

    asyncio.run(main())
    # The outsider's rows went to the default namespace, and the tenant was not served them.
    assert sorted(e.namespace for e in llmcache.held(model).entries) == ["", "", "tenant-a", "tenant-a"]
    assert llmcache.stats(model).hits == 0

    async def in_a_worker_thread():
        with llmcache.namespace("tenant-b"):
            await asyncio.to_thread(forward)

    asyncio.run(in_a_worker_thread())
    assert sorted(e.namespace for e in llmcache.held(model).entries).count("tenant-b") == 2
    assert llmcache.stats(model).hits == 0
