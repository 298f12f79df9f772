"""Decoders reuse the longest cached prefix of every row (llmcache/prefix.py).

Random Llama, Qwen2, Mistral and GPT-2 configs (rotary and absolute positions, grouped KV heads),
and the real SmolLM2 where its package is installed. Every check compares with an uncached copy
of the same weights.

Rows computed against cached K/V are compared within PREFIX_TOLERANCE (`helpers.assert_outputs`
says why and what was measured), and `generate` tokens must be identical. Whole-row repeats are
still served bit for bit (tests/test_families.py).
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from helpers import PREFIX_TOLERANCE, assert_outputs, batch
from models import decoded_pages, smollm2, tiny_model

import llmcache

PAGE = 8  # CacheConfig.page_tokens default
FAMILIES = ["llama", "qwen2", "mistral", "gpt2"]
# tests/models.py's tiny configs, smaller (hidden 32, 101 ids) and without the special tokens the
# configs' own defaults lack: the configs PREFIX_TOLERANCE was measured on.
SMALL = {"vocab_size": 101, "hidden_size": 32, "intermediate_size": 64, "pad_token_id": None}
SIZES = {"llama": SMALL, "mistral": SMALL, "qwen2": {**SMALL, "bos_token_id": None, "eos_token_id": None},
         "gpt2": {"vocab_size": 101, "n_embd": 32, "n_positions": 256}}


def build(family: str, seed: int = 0, **config):
    """(accelerated model, uncached copy of the same weights)."""
    model = tiny_model(family, seed=seed, **SIZES[family])
    return llmcache.accelerate(copy.deepcopy(model), **config), model


def other(token: torch.Tensor) -> torch.Tensor:
    """A one-token tensor holding another id than `token`'s."""
    return 3 + (token - 2) % 98


@pytest.fixture
def tokens(gen):
    return lambda n: torch.randint(3, 101, (n,), generator=gen)


# ---- every shared-prefix length, both paddings, every family --------------------------------------
@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("side", ["right", "left"])
def test_shared_prefixes_of_every_length_compute_only_their_suffix(family, side, tokens):
    model, ref = build(family)
    base = tokens(40)
    with torch.inference_mode():
        model(**batch(side, [base], positions=True))  # pages [0, 8), ..., [32, 40) cached
        # Shared with `base`: 0 tokens, a page less one, one page, several pages, the whole prompt.
        cases = {0: torch.cat([other(base[:1]), base[1:12]]), PAGE - 1: torch.cat([base[:7], other(base[7:8]), tokens(8)]),
                 PAGE: torch.cat([base[:8], tokens(5)]), 4 * PAGE: torch.cat([base[:32], tokens(11)]),
                 40: base[:40].clone()}
        for shared, row in cases.items():
            inputs = batch(side, [row], positions=True)
            want = ref(**inputs).logits
            got = model(**inputs).logits
            assert_outputs(got, want, inputs["attention_mask"], tolerance=PREFIX_TOLERANCE)
            served, computed = llmcache.stats(model).last_tokens
            if shared == 40:  # a whole repeat: served by the block splice, nothing computed
                assert (served, computed) == (40, 0)
                assert torch.equal(got[inputs["attention_mask"].bool()],
                                   model(**inputs).logits[inputs["attention_mask"].bool()])
            else:
                cached = shared // PAGE * PAGE  # whole pages only
                assert (served, computed) == (cached, len(row) - cached), (shared, served, computed)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_prompt_one_token_past_its_cached_pages(family, tokens):
    """Whole cached pages and then a single token: there is no partial page to look for after the run
    (a page of k < 1 tokens), and the row computes that one token."""
    model, ref = build(family)
    base = tokens(2 * PAGE + 1)
    with torch.inference_mode():
        model(input_ids=base[None, : 2 * PAGE])
        got = model(input_ids=base[None]).logits
        assert llmcache.stats(model).last_tokens == (2 * PAGE, 1)
        assert_outputs(got, ref(input_ids=base[None]).logits, tolerance=PREFIX_TOLERANCE)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("side", ["right", "left"])
def test_a_prompt_continuing_a_partial_page_reuses_its_tokens(family, side, tokens):
    """A row's last page is stored even when partial (13 tokens: a page and 5); a longer prompt
    through it serves those 5 too, and the page it writes there (5 cached + 3 computed tokens) and
    after serve the next prompt in turn; in a batch with other rows as well."""
    model, ref = build(family)
    first = tokens(13)
    second = torch.cat([first, tokens(6)])
    third = torch.cat([second, tokens(2)])
    mixed = [torch.cat([second, tokens(4)]), tokens(9), first.clone()]
    with torch.inference_mode():
        for rows, served in (([first], [0]), ([second], [13]), ([third], [19]), (mixed, [19, 0, 13])):
            inputs = batch(side, rows, positions=True)
            assert_outputs(model(**inputs).logits, ref(**inputs).logits, inputs["attention_mask"],
                           tolerance=PREFIX_TOLERANCE)
            if len(rows) == 1:  # (a batch's tokens are counted together)
                assert llmcache.stats(model).last_tokens == (served[0], len(rows[0]) - served[0])
            else:
                # (Leading padding the caller sees is keyed with its row: those rows start new chains.)
                assert llmcache.stats(model).last_tokens[0] == (sum(served) if side == "right" else 0)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("side", ["right", "left"])
def test_a_batch_mixing_cached_lengths_matches_the_uncached_model(family, side, tokens):
    # (padding="masked": padded rows are served and compute from their prefix whatever their
    # padding; tests/test_padding.py holds the exact padding of the default)
    model, ref = build(family, padding="masked")
    system = tokens(3 * PAGE + 5)
    with torch.inference_mode():
        model(**batch(side, [torch.cat([system, tokens(4)])], positions=True))
        rows = [torch.cat([system, tokens(7)]),  # 3 pages cached
                torch.cat([system[:PAGE + 2], tokens(12)]),  # 1 page
                tokens(9),  # none
                torch.cat([system, tokens(1)]),  # 3 pages, a 6-token suffix
                system[:2 * PAGE].clone()]  # 2 pages: its last token computes
        inputs = batch(side, rows, positions=True)
        want = ref(**inputs)
        got = model(**inputs)
        assert_outputs(got.logits, want.logits, inputs["attention_mask"], tolerance=PREFIX_TOLERANCE)
        served, computed = llmcache.stats(model).last_tokens
        assert served == 3 * PAGE + PAGE + 0 + 3 * PAGE + (2 * PAGE - 1)
        assert served + computed == int(inputs["attention_mask"].sum())
        s = llmcache.stats(model)
        assert (s.prefix_rows, s.hits) == (3, 1)  # the last row is whole: it computes its last token only
        # The returned KV cache continues decoding as the uncached one does.
        step = {"input_ids": torch.full((len(rows), 1), 5),
                "attention_mask": torch.cat([inputs["attention_mask"], torch.ones(len(rows), 1, dtype=torch.long)], 1)}
        step["position_ids"] = step["attention_mask"].sum(1, keepdim=True) - 1
        want_next = ref(**step, cache=want.cache).logits
        got_next = model(**step, cache=got.cache).logits
        assert_outputs(got_next, want_next, tolerance=PREFIX_TOLERANCE)


def test_hidden_states_at_every_position_come_from_the_bank_or_the_suffix(tokens):
    model, ref = build("llama", padding="masked")
    system = tokens(2 * PAGE)
    with torch.inference_mode():
        model.model(**batch("right", [torch.cat([system, tokens(3)])], positions=True))
        inputs = batch("left", [torch.cat([system, tokens(6)]), torch.cat([system[:PAGE], tokens(2)])], positions=True)
        want = ref.model(**inputs).last_hidden_state
        got = model.model(**inputs).last_hidden_state
    assert llmcache.stats(model).last_tokens == (3 * PAGE, 6 + 2)
    assert_outputs(got, want, inputs["attention_mask"], tolerance=PREFIX_TOLERANCE)
    assert torch.all(got[~inputs["attention_mask"].bool()] == 0)  # padding: zeros, as served rows are


# ---- generate --------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("how", ["greedy", "beam", "sample"])
def test_generate_with_prefix_hits_gives_the_uncached_tokens(family, how, tokens):
    model, ref = build(family)
    system = tokens(2 * PAGE + 3)
    kwargs = {"max_new_tokens": 6, "pad_token_id": 0}
    kwargs.update({"greedy": {"do_sample": False}, "beam": {"num_beams": 3, "do_sample": False},
                   "sample": {"do_sample": True, "top_k": 20}}[how])
    with torch.inference_mode():
        model(**batch("left", [torch.cat([system, tokens(5)])], positions=True))
        for _ in range(2):  # the second round also hits the first round's prompts
            inputs = batch("left", [torch.cat([system, tokens(k)]) for k in (2, 9, 4)], positions=True)
            inputs.pop("position_ids")
            torch.manual_seed(3)
            want = ref.generate(**inputs, **kwargs)
            torch.manual_seed(3)
            got = model.generate(**inputs, **kwargs)
            assert torch.equal(got, want)
            assert llmcache.stats(model).last_tokens[0] >= 3 * 2 * PAGE  # the prefill reused the prefix


def test_a_multi_turn_chat_hits_every_earlier_turn(tokens):
    """Each turn's prompt is the conversation so far: the prefill computes from the previous
    answer's last token on (generate's decode steps stored their pages, the last partial one too)."""
    model, ref = build("qwen2")
    conversation, fed, pages = tokens(11), 0, 0
    with torch.inference_mode():
        for _ in range(4):
            inputs = {"input_ids": conversation[None], "attention_mask": torch.ones(1, len(conversation), dtype=torch.long)}
            kw = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}  # 5 steps
            want, got = ref.generate(**inputs, **kw), model.generate(**inputs, **kw)
            assert torch.equal(got, want)
            s = llmcache.stats(model)
            served, computed = s.last_tokens
            assert served == fed and served + computed == len(conversation)
            # The prompt and 4 of its 5 new tokens ran through the model (the last one is only sampled).
            fed = len(conversation) + 4
            assert s.decode_pages == pages + decoded_pages([len(conversation)], 4)
            pages = s.decode_pages
            conversation = torch.cat([got[0], tokens(6)])  # the reply, then the user's next message



def test_a_prefix_hit_hands_back_a_plain_cache_holding_the_uncached_calls_kv(tokens):
    """The cached prefix is read into the K/V tensors that the caller's cache ends up holding, with
    room for the suffix, which the model's cache update writes there in place of concatenating it:
    the caller gets a plain DynamicCache of contiguous K/V, within the tolerance of the uncached
    call's (bit for bit at the prefix, read back as stored), whose next updates concatenate as ever;
    a forward that fails midway leaves nothing of the cache's own on the caller's cache."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    model, ref = build("llama")
    prompt, more = tokens(3 * PAGE + 5), tokens(3)
    caches = []
    with torch.inference_mode():
        model(input_ids=prompt[None, : 3 * PAGE])  # pages [0, 24) cached
        for m in (model, ref):
            cache = DynamicCache()
            m(input_ids=prompt[None], past_key_values=cache, use_cache=True)
            if m is model:
                assert llmcache.stats(model).last_tokens == (3 * PAGE, 5)  # a prefix hit
                # (the suffix's K/V went into the room after the prefix read: every layer's are views of one buffer)
                assert len({t.untyped_storage().data_ptr() for layer in cache.layers for t in (layer.keys, layer.values)}) == 1
            out = m(input_ids=more[None], past_key_values=cache, use_cache=True,
                    position_ids=torch.arange(len(prompt), len(prompt) + 3)[None])
            caches.append((cache, out.logits))
    (got, got_logits), (want, want_logits) = caches
    assert_outputs(got_logits, want_logits, tolerance=PREFIX_TOLERANCE)
    for mine, theirs in zip(got.layers, want.layers):
        assert type(mine) is DynamicLayer and "update" not in vars(mine)
        plain = lambda layer: {k: v for k, v in vars(layer).items() if not isinstance(v, torch.Tensor)}
        assert plain(mine) == plain(theirs)  # (device, is_initialized: what the layer's own first update sets)
        assert mine.keys.shape == theirs.keys.shape == (1, mine.keys.shape[1], len(prompt) + 3, mine.keys.shape[3])
        assert mine.keys.is_contiguous() and mine.values.is_contiguous()
        torch.testing.assert_close(mine.keys, theirs.keys, **PREFIX_TOLERANCE)
        torch.testing.assert_close(mine.values, theirs.values, **PREFIX_TOLERANCE)

    blocks = model.model.layers
    handle = blocks[1].register_forward_pre_hook(lambda *_: (_ for _ in ()).throw(RuntimeError("a block fails")))
    try:
        failed = DynamicCache()
        with torch.inference_mode(), pytest.raises(RuntimeError, match="a block fails"):
            model(input_ids=torch.cat([prompt[: 3 * PAGE], tokens(4)])[None], past_key_values=failed, use_cache=True)
    finally:
        handle.remove()
    assert llmcache.stats(model).last_tokens[0] == 3 * PAGE  # (it was a prefix hit)
    assert failed.layers and not any("update" in vars(layer) for layer in failed.layers)



def test_a_kept_cache_is_never_overwritten_by_a_later_prefix_hit(tokens):
    """The K/V a prefix hit hands the caller's cache stay the caller's: a later prefix hit (the
    same thread, the same shapes, another suffix) reads its prefix elsewhere while that cache is
    held, and the kept cache goes on giving the uncached model's next token."""
    from transformers import DynamicCache

    model, ref = build("llama")
    system = tokens(3 * PAGE)
    with torch.inference_mode():
        model(input_ids=system[None])
        kept, first = DynamicCache(), torch.cat([system, tokens(5)])
        model(input_ids=first[None], past_key_values=kept, use_cache=True)
        assert llmcache.stats(model).last_tokens == (3 * PAGE, 5)
        snapshot = [(layer.keys.clone(), layer.values.clone()) for layer in kept.layers]
        for _ in range(3):
            model(input_ids=torch.cat([system, tokens(5)])[None], past_key_values=DynamicCache(), use_cache=True)
            assert llmcache.stats(model).last_tokens == (3 * PAGE, 5)
        assert all(torch.equal(layer.keys, k) and torch.equal(layer.values, v)
                   for layer, (k, v) in zip(kept.layers, snapshot))
        step = tokens(1)
        position = torch.tensor([[len(first)]])
        got = model(input_ids=step[None], past_key_values=kept, use_cache=True, position_ids=position).logits
        want = ref(input_ids=torch.cat([first, step])[None]).logits[:, -1:]
    assert_outputs(got, want, tolerance=PREFIX_TOLERANCE)


# ---- memory, eviction, isolation, threads ----------------------------------------------------------
def test_a_shared_prefix_is_held_once_however_many_prompts_extend_it(tokens):
    model, _ = build("llama")
    system = tokens(4 * PAGE)
    with torch.inference_mode():
        for _ in range(10):
            model(**batch("right", [torch.cat([system, tokens(PAGE)])], positions=True))
    held = llmcache.held(model).entries
    assert len(held) == 4 + 10  # the system prompt's four pages once, one page per prompt after it
    first_pages = [e for e in held if e.parent == -1]
    assert len(first_pages) == 1 and first_pages[0].ids == tuple(system[:PAGE].tolist())
    serials = {e.serial for e in held}
    assert all(e.parent == -1 or e.parent in serials for e in held)
    s = llmcache.stats(model)
    assert s.bytes == sum(e.bytes for e in held) and s.entries == len(held)


def test_eviction_under_a_small_budget_never_serves_a_freed_page(gen, tokens):
    model, ref = build("gpt2")
    with torch.inference_mode():
        model(**batch("right", [tokens(3)], positions=True))
    one_page = llmcache.held(model).entries[0].bytes
    llmcache.disable(model)
    llmcache.accelerate(model, max_bytes=12 * one_page)
    systems = [tokens(3 * PAGE) for _ in range(3)]
    with torch.inference_mode():
        for i in range(30):
            system = systems[int(torch.randint(0, 3, (1,), generator=gen))]
            rows = [torch.cat([system[: PAGE * int(torch.randint(1, 4, (1,), generator=gen))], tokens(5)])
                    for _ in range(2)]
            inputs = batch("left" if i % 2 else "right", rows, positions=True)
            assert_outputs(model(**inputs).logits, ref(**inputs).logits, inputs["attention_mask"],
                           tolerance=PREFIX_TOLERANCE)
            held = llmcache.held(model).entries
            serials = {e.serial for e in held}
            assert all(e.parent == -1 or e.parent in serials for e in held), "a page outlived its prefix"
            assert sum(e.pages for e in held) <= 12
    s = llmcache.stats(model)
    assert s.evictions > 0 and s.tokens_served > 0


def test_namespaces_isolate_prefixes(tokens):
    model, _ = build("mistral")
    system = tokens(2 * PAGE)
    with torch.inference_mode():
        with llmcache.namespace("tenant-a"):
            model(**batch("right", [torch.cat([system, tokens(3)])], positions=True))
        with llmcache.namespace("tenant-b"):
            model(**batch("right", [torch.cat([system, tokens(3)])], positions=True))
            assert llmcache.stats(model).last_tokens[0] == 0
        with llmcache.namespace("tenant-a"):
            model(**batch("right", [torch.cat([system, tokens(3)])], positions=True))
            assert llmcache.stats(model).last_tokens[0] == 2 * PAGE


def test_threads_sharing_prefixes_get_the_uncached_outputs(tokens):
    model, ref = build("llama")
    systems = [tokens(2 * PAGE + 1) for _ in range(2)]
    work = [batch("left" if i % 2 else "right",
                  [torch.cat([systems[i % 2], tokens(3 + i % 5)]), torch.cat([systems[(i + 1) % 2], tokens(4)])],
                  positions=True) for i in range(24)]
    with torch.inference_mode():
        want = [ref(**w).logits for w in work]
    errors = []

    def run(part):
        try:
            with torch.inference_mode():
                for i in part:
                    assert_outputs(model(**work[i]).logits, want[i], work[i]["attention_mask"],
                                   tolerance=PREFIX_TOLERANCE)
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(range(k, 24, 3),)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert llmcache.stats(model).tokens_served > 0


def test_stats_count_tokens_served_and_computed(tokens):
    model, _ = build("llama")
    system = tokens(PAGE * 2)
    with torch.inference_mode():
        model(**batch("right", [torch.cat([system, tokens(4)])], positions=True))
        assert llmcache.stats(model).last_tokens == (0, 2 * PAGE + 4)
        model(**batch("right", [torch.cat([system, tokens(7)])], positions=True))
        s = llmcache.stats(model)
    assert s.last_tokens == (2 * PAGE, 7)
    assert (s.tokens_served, s.tokens_computed, s.prefix_rows) == (2 * PAGE, 2 * PAGE + 4 + 7, 1)
    assert "tokens served 16" in str(s)


def test_save_and_load_keep_the_prefix_tree(tokens, tmp_path):
    model, ref = build("qwen2")
    fresh, _ = build("qwen2")  # (outside inference_mode: weights built in it are inference tensors, run uncached)
    system = tokens(3 * PAGE)
    with torch.inference_mode():
        model(**batch("right", [torch.cat([system, tokens(2)]), torch.cat([system[:PAGE], tokens(5)])], positions=True))
        llmcache.save(model, tmp_path / "c.safetensors")
        llmcache.load(fresh, tmp_path / "c.safetensors")
        inputs = batch("left", [torch.cat([system, tokens(6)])], positions=True)
        assert_outputs(fresh(**inputs).logits, ref(**inputs).logits, inputs["attention_mask"],
                       tolerance=PREFIX_TOLERANCE)
        assert llmcache.stats(fresh).last_tokens == (3 * PAGE, 6)
        # A page loaded from the file extends by new pages with new serial numbers.
        serials = [e.serial for e in llmcache.held(fresh).entries]
        assert len(serials) == len(set(serials))


# ---- the real model --------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_chat_turns_reuse_the_conversation_so_far():
    model, tok = smollm2()
    ref = copy.deepcopy(model)
    llmcache.accelerate(model)
    messages = [{"role": "system", "content": "You are a concise assistant who answers in one sentence."}]
    previous = 0
    try:
        with torch.inference_mode():
            for question in ["What is the capital of France?", "And of Italy?", "Which is larger?"]:
                messages.append({"role": "user", "content": question})
                text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                inputs = tok(text, return_tensors="pt")
                want = ref(**inputs).logits
                got = model(**inputs).logits
                assert_outputs(got, want, tolerance=PREFIX_TOLERANCE)
                out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
                assert torch.equal(out, ref.generate(**inputs, max_new_tokens=12, do_sample=False))
                assert llmcache.stats(model).last_tokens[0] >= previous // PAGE * PAGE - PAGE
                previous = inputs["input_ids"].shape[1]
                messages.append({"role": "assistant",
                                 "content": tok.decode(out[0, previous:], skip_special_tokens=True)})
    finally:
        llmcache.disable(model)
