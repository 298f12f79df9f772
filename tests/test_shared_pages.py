"""Decoder pages on the shared tier, on a real redis-server (tests/redis_server.py starts one per test).

A replica prefills from the pages another computed (a chain looked up in two round trips) and
stays within PREFIX_TOLERANCE of its uncached run, with identical `generate` tokens; other weights,
dtype, adapter, model state or namespace never see them; a server killed mid-stream never fails a
forward; corrupted, truncated, foreign, misplaced and orphan pages are refused, counted and
recomputed, and the recomputed page replaces the bad one.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import PREFIX_TOLERANCE, assert_outputs
from models import tiny_model

import llmcache
from llmcache.shared import values

pytest.importorskip("redis")
WORKER = Path(__file__).with_name("shared_pages_worker.py")
PAGE = 8
CONFIG = {"max_position_embeddings": 1024}
GREEDY = {"do_sample": False, "pad_token_id": 0, "eos_token_id": None}


def shared(url: str, **kwargs) -> llmcache.Shared:
    return llmcache.Shared(url, **{"lookup": "always", "backoff": (0.05, 0.2), "timeout": 1.0, **kwargs})


def replica(url: str, model=None, **kwargs):
    model = tiny_model("llama", "ForCausalLM", **CONFIG) if model is None else model
    return llmcache.accelerate(model, shared=shared(url, **kwargs))


def plain(seed: int = 0):
    return tiny_model("llama", "ForCausalLM", seed=seed, **CONFIG)


def ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(seed))


def logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=tokens[None]).logits


def chain(server) -> list[bytes]:
    """The Redis keys of the one chain of pages the server holds, first page first."""
    client = server.client()
    head = values.HEAD
    pages = {}
    for key in client.keys("llmcache:*"):
        value = client.get(key)
        key_len, parent_len = head.unpack_from(value)[5:7]
        at = values.HEAD_BYTES
        pages[value[at + key_len : at + key_len + parent_len]] = (key, value[at : at + key_len])
    order, parent = [], b""
    while parent in pages:
        key, parent = pages[parent]
        order.append(key)
    assert len(order) == len(pages), "the server holds more than one chain"
    return order


# ---- sharing ----------------------------------------------------------------------------------
def test_a_second_process_prefills_from_the_pages_the_first_computed(redis_server, tmp_path):
    def worker(name, first, *flags):
        out = tmp_path / f"{name}.pt"
        subprocess.run([sys.executable, str(WORKER), redis_server.url, str(out), str(first), *flags], check=True,
                       timeout=300)
        return torch.load(out)

    a = worker("a", 0)
    b = worker("b", 2, "--save", str(tmp_path / "b.llmcache"))
    assert a["shared"]["tokens_served"] == 0 and a["served"][1] >= 512  # its second prompt: its own bank
    # b's first prompt: the 512-token system prompt's 64 pages came from Redis.
    assert b["served"][0] >= 512 and b["shared"]["tokens_served"] >= 512 and b["shared"]["refused"] == {}
    for run in (a, b):
        for got, want in zip(run["logits"], run["plain_logits"]):
            assert_outputs(got, want, tolerance=PREFIX_TOLERANCE)
        for got, want in zip(run["tokens"], run["plain_tokens"]):
            assert torch.equal(got, want)
    # A process that loads the file b saved serves its pages (no shared tier).
    c = worker("c", 2, "--load", str(tmp_path / "b.llmcache"))
    assert c["served"][0] == 512 + 9 + 2  # every token of the prompt: b computed and saved them all
    for got, want in zip(c["logits"], c["plain_logits"]):
        assert_outputs(got, want, tolerance=PREFIX_TOLERANCE)


def test_generated_pages_travel_too(redis_server):
    ref = plain()
    a, b = replica(redis_server.url, copy.deepcopy(ref)), replica(redis_server.url, copy.deepcopy(ref))
    prompt = ids(21, 1)
    with torch.inference_mode():
        answer = a.generate(input_ids=prompt[None], max_new_tokens=20, **GREEDY)[0]
    assert llmcache.stats(a).decode_pages > 0 and llmcache.flush(a)
    turn = torch.cat([answer, ids(5, 2)])
    assert_outputs(logits(b, turn), logits(ref, turn), tolerance=PREFIX_TOLERANCE)
    # 21 + 19 tokens ran through a's model: five whole pages, all from Redis.
    assert llmcache.stats(b).last_tokens[0] == 5 * PAGE == llmcache.stats(b).shared.tokens_served
    assert llmcache.stats(b).shared.round_trips == 2  # which pages Redis holds, then the run of them


@pytest.mark.parametrize("other", ["weights", "dtype", "namespace", "autocast", "adapter"])
def test_other_weights_dtype_state_adapter_or_namespace_never_see_pages(redis_server, other):
    peft = pytest.importorskip("peft") if other == "adapter" else None
    if other == "adapter":
        def build():
            torch.manual_seed(1)
            config = lambda: peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
            model = peft.get_peft_model(plain(), config(), adapter_name="one")
            model.add_adapter("two", config())
            return model.eval()
        a, b = replica(redis_server.url, build()), replica(redis_server.url, build())
        b.set_adapter("two")
    else:
        a = replica(redis_server.url)
        b = replica(redis_server.url, {"weights": plain(seed=1), "dtype": plain().double()}.get(other, plain()))
    prompt = ids(40, 3)
    logits(a, prompt)
    assert llmcache.flush(a) and llmcache.stats(a).shared.writes == 5
    if other == "namespace":
        with llmcache.namespace("tenant-b"):
            logits(b, prompt)
    elif other == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits(b, prompt)
    else:
        logits(b, prompt)
    s = llmcache.stats(b)
    assert s.shared.lookups == 5 and s.shared.hits == 0 and s.shared.refused == {}
    assert s.tokens_served == 0


def test_server_killed_mid_stream_every_forward_is_right(redis_server):
    ref = plain()
    a, b = replica(redis_server.url, copy.deepcopy(ref)), replica(redis_server.url, copy.deepcopy(ref))
    system = ids(64, 4)
    logits(a, torch.cat([system, ids(3, 5)]))
    assert llmcache.flush(a)
    redis_server.stop()
    for seed in range(6, 9):
        prompt = torch.cat([system, ids(seed, seed)])
        assert_outputs(logits(b, prompt), logits(ref, prompt), tolerance=PREFIX_TOLERANCE)
        with torch.inference_mode():
            got = b.generate(input_ids=prompt[None], max_new_tokens=4, **GREEDY)
            assert torch.equal(got, ref.generate(input_ids=prompt[None], max_new_tokens=4, **GREEDY))
    s = llmcache.stats(b).shared
    assert s.errors.get("connection", 0) >= 1 and s.hits == 0


# ---- pages that must not be served --------------------------------------------------------------
def _tamper(client, keys: list, how: str) -> None:
    """Spoil the third page of the chain `keys` (Redis keys, first page first)."""
    bad = keys[2]
    value = client.get(bad)
    if how == "checksum":
        flipped = bytearray(value)
        flipped[-3] ^= 0x40
        client.set(bad, bytes(flipped))
    elif how == "truncated":
        client.set(bad, value[:-5])
    elif how == "key":  # another page's value under its key
        client.set(bad, client.get(keys[3]))
    elif how in ("parent", "non_finite"):  # checksummed: after another page / holding a NaN
        head = values.HEAD.unpack_from(value)
        n, f, key_len, parent_len, fingerprint = head[3], head[4], head[5], head[6], head[8]
        at = values.HEAD_BYTES
        page_key, parent = value[at : at + key_len], value[at + key_len : at + key_len + parent_len]
        states = torch.frombuffer(bytearray(value[at + key_len + parent_len :]), dtype=torch.float32).view(n, f)
        if how == "non_finite":
            states[3, 5] = float("nan")
        else:
            parent = bytes(32)
        client.set(bad, values.encode(fingerprint, page_key, values.host_bytes(states), torch.float32, parent))
    elif how == "orphan":  # gone: the pages after it have no parent
        client.delete(bad)


@pytest.mark.parametrize("how", ["checksum", "truncated", "key", "parent", "non_finite", "orphan"])
def test_bad_pages_are_refused_counted_recomputed_and_replaced(redis_server, how):
    ref = plain()
    a, b, c = (replica(redis_server.url, copy.deepcopy(ref)) for _ in range(3))
    prompt = ids(37, 9)  # pages of 8, 8, 8, 8 and 5 tokens
    logits(a, prompt)
    assert llmcache.flush(a)
    keys = chain(redis_server)
    assert len(keys) == 5
    _tamper(redis_server.client(), keys, how)
    assert_outputs(logits(b, prompt), logits(ref, prompt), tolerance=PREFIX_TOLERANCE)
    s = llmcache.stats(b)
    # Served: the two pages before the bad one; the bad one refused, the two after it orphans.
    want = {"orphan": 2} if how == "orphan" else {how: 1, "orphan": 2}
    assert s.shared.refused == want and s.shared.hits == 2 and s.last_tokens == (2 * PAGE, 37 - 2 * PAGE)
    assert llmcache.flush(b)
    # b wrote the page it recomputed over the bad one; the two after it were held already (SET NX).
    assert llmcache.stats(b).shared.writes == 1
    assert llmcache.stats(b).shared.write_drops == {"exists": 2}
    assert_outputs(logits(c, prompt), logits(ref, prompt), tolerance=PREFIX_TOLERANCE)
    assert llmcache.stats(c).shared.refused == {} and llmcache.stats(c).last_tokens == (37, 0)
