"""`llmcache.metrics`: `stats(model)` exported to Prometheus, scraped over HTTP.

Each test serves a fresh `CollectorRegistry` with `prometheus_client.start_http_server` on a free
loopback port, scrapes /metrics with urllib, parses the text with prometheus_client's parser and
compares every sample with `llmcache.stats(model)` read after the scrape (nothing runs between
the two). Latencies are only checked for presence, sign and count, never against a time.
"""

from __future__ import annotations

import gc
import subprocess
import sys
import urllib.request

import pytest
import torch
from helpers import batch
from models import VOCAB, tiny_model
from redis_server import free_port

import llmcache

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families

from llmcache import metrics

COUNTERS = {"forwards": "forwards", "rows": "rows", "lookups": "lookups", "hits": "hits", "exact_hits": "exact_hits",
            "semantic_hits": "semantic_hits", "repeats": "repeats", "prefix_rows": "prefix_rows",
            "tokens_served": "tokens_served", "tokens_computed": "tokens_computed", "insertions": "insertions",
            "evictions": "evictions", "invalidations": "invalidations", "fingerprint_seconds": "fingerprint_s",
            "lookup_seconds": "lookup_s"}
GAUGES = {"entries": "entries", "bytes": "bytes", "bytes_reserved": "bytes_reserved", "hit_rate": "hit_rate"}
LAYER_COUNTERS = ["lookups", "hits", "exact_hits", "semantic_hits", "insertions", "evictions"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one intra-op thread is fastest on a loaded machine (restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Scraper:
    """A registry served over HTTP on a free port; `scrape()` -> {(sample name, labels): value}."""

    def __init__(self):
        self.registry = prometheus_client.CollectorRegistry()
        self.port = free_port()
        self.server, self.thread = prometheus_client.start_http_server(self.port, addr="127.0.0.1",
                                                                       registry=self.registry)
        self.text = ""

    def scrape(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10) as response:
            self.text = response.read().decode()
        return {(s.name, frozenset(s.labels.items())): s.value
                for family in text_string_to_metric_families(self.text) for s in family.samples}

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def scraper():
    s = Scraper()
    try:
        yield s
    finally:
        s.close()


def value(samples: dict, name: str, **labels):
    return samples.get((name, frozenset(labels.items())))


def models_in(samples: dict) -> set:
    return {dict(labels).get("model") for _, labels in samples}


def check_model(samples: dict, name: str, s: llmcache.CacheStats) -> None:
    """Every per-model, not_cached and per-layer sample of `name` equals the snapshot `s`."""
    for metric, field in COUNTERS.items():
        assert value(samples, f"llmcache_{metric}_total", model=name) == float(getattr(s, field)), metric
    for metric, field in GAUGES.items():
        assert value(samples, f"llmcache_{metric}", model=name) == float(getattr(s, field)), metric
    exported = {dict(labels)["reason"]: v for (n, labels), v in samples.items()
                if n == "llmcache_not_cached_rows_total" and dict(labels)["model"] == name}
    assert exported == {k: float(v) for k, v in s.not_cached.items()}
    assert value(samples, "llmcache_last_tokens", model=name, kind="served") == s.last_tokens[0]
    assert value(samples, "llmcache_last_tokens", model=name, kind="computed") == s.last_tokens[1]
    assert len(s.layers) == 3
    for layer in s.layers:
        labels = {"model": name, "layer": str(layer.layer), "tier": s.tier}
        for metric in LAYER_COUNTERS:
            assert value(samples, f"llmcache_layer_{metric}_total", **labels) == getattr(layer, metric), metric
        assert value(samples, "llmcache_layer_lookup_seconds_total", **labels) == layer.lookup_s
        assert value(samples, "llmcache_layer_bytes", **labels) == layer.bytes
        assert value(samples, "llmcache_layer_hit_rate", **labels) == layer.hit_rate


def run(model, inputs: dict, **kwargs) -> None:
    with torch.inference_mode():
        model(**inputs, **kwargs)


def test_import_llmcache_does_not_import_prometheus_client():
    code = "import sys, llmcache; assert 'prometheus_client' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_scrape_equals_stats_per_model_layer_and_reason(scraper, gen):
    a = llmcache.accelerate(tiny_model("bert", seed=0))
    b = llmcache.accelerate(tiny_model("bert", seed=1))
    returned = metrics.register(a, "a", scraper.registry)
    assert metrics.register(b, "b", scraper.registry) is returned  # one collector per registry
    inputs = batch("bert", [5, 7, 6], gen)
    twice = {k: torch.cat([v, v[:2]]) for k, v in inputs.items()}  # rows 3, 4 repeat rows 0, 1
    run(a, inputs)
    run(a, twice)  # 5 rows from the bank
    run(a, inputs, output_hidden_states=True)  # uncached, by reason
    a(**inputs)  # grad enabled with parameters that require grad: uncached ("grad")
    run(b, twice)
    samples = scraper.scrape()
    sa, sb = llmcache.stats(a), llmcache.stats(b)
    assert sa.hits == 5 and sb.repeats == 2 and set(sa.not_cached) == {"output_hidden_states", "grad"}
    check_model(samples, "a", sa)
    check_model(samples, "b", sb)
    assert value(samples, "llmcache_forwards_total", model="a") == 4
    assert value(samples, "llmcache_forwards_total", model="b") == 1  # told apart by label
    assert value(samples, "llmcache_shared_up", model="a", tier="shared") is None  # no shared tier
    assert not any(n.startswith("llmcache_semantic_") and n != "llmcache_semantic_hits_total" for n, _ in samples)

    more = batch("bert", [4, 9], gen)
    run(a, more)
    run(a, more)
    samples = scraper.scrape()  # a fresh stats() per scrape
    sa = llmcache.stats(a)
    assert sa.forwards == 6 and sa.hits == 7
    check_model(samples, "a", sa)
    check_model(samples, "b", llmcache.stats(b))


def test_register_unregister_and_models_that_go_away(scraper, gen):
    a = llmcache.accelerate(tiny_model("bert", seed=0))
    b = llmcache.accelerate(tiny_model("bert", seed=1))
    c = llmcache.accelerate(tiny_model("bert", seed=2))
    for model, name in ((a, "a"), (b, "b"), (c, "c")):
        metrics.register(model, name, scraper.registry)
        run(model, batch("bert", [5, 6], gen))
    with pytest.raises(ValueError, match="'a' is already registered"):
        metrics.register(b, "a", scraper.registry)
    with pytest.raises(ValueError, match="not accelerated"):
        metrics.register(tiny_model("bert"), "d", scraper.registry)
    assert models_in(scraper.scrape()) == {"a", "b", "c"}

    metrics.unregister("b", scraper.registry)
    metrics.unregister(a, scraper.registry)  # by the model itself
    assert models_in(scraper.scrape()) == {"c"}
    with pytest.raises(ValueError, match="'b' is not registered"):
        metrics.unregister("b", scraper.registry)
    metrics.register(b, "b", scraper.registry)  # the name is free again

    llmcache.disable(b)  # no longer accelerated: left out
    del c, model  # (the loop's last model is c)
    gc.collect()  # garbage-collected: left out, and its name is free
    samples = scraper.scrape()
    assert models_in(samples) == set()
    metrics.register(a, "c", scraper.registry)
    assert models_in(scraper.scrape()) == {"c"}

    metrics.register(a, "default-registry-test")  # prometheus_client.REGISTRY
    try:
        assert 'llmcache_forwards_total{model="default-registry-test"} 1.0' in \
            prometheus_client.generate_latest().decode()
    finally:
        metrics.unregister("default-registry-test")
    assert "default-registry-test" not in prometheus_client.generate_latest().decode()


def test_shared_tier_metrics_equal_shared_stats(scraper, redis_server, gen):
    shared = llmcache.Shared(redis_server.url, lookup="always", timeout=1.0)  # (a loaded machine must not time out)
    a = llmcache.accelerate(tiny_model("bert"), shared=shared)
    b = llmcache.accelerate(tiny_model("bert"), shared=shared)  # same seed: same weights, same entries
    metrics.register(a, "a", scraper.registry)
    metrics.register(b, "b", scraper.registry)
    try:
        inputs = batch("bert", [5, 7, 6], gen)
        run(a, inputs)
        assert llmcache.flush(a)
        run(b, inputs)  # every row from Redis
        assert llmcache.flush(b)
        samples = scraper.scrape()
        for name, model in (("a", a), ("b", b)):
            check_shared(samples, name, llmcache.stats(model).shared)
            assert value(samples, "llmcache_shared_up", model=name, tier="shared") == 1
        sb = llmcache.stats(b).shared
        assert sb.hits == 3 and sb.bytes_read > 0 and llmcache.stats(a).shared.writes == 3
        assert value(samples, "llmcache_shared_state", model="b", tier="shared", state="up",
                     url=redis_server.url) == 1

        redis_server.stop()
        run(b, batch("bert", [8, 4], gen))  # new rows: the lookup fails, they compute
        samples = scraper.scrape()
        sb = llmcache.stats(b).shared
        assert sum(sb.errors.values()) >= 1 and sb.state != "up"
        check_shared(samples, "b", sb)
        assert value(samples, "llmcache_shared_up", model="b", tier="shared") == 0
    finally:
        llmcache.disable(a)
        llmcache.disable(b)


def check_shared(samples: dict, name: str, sh: llmcache.SharedStats) -> None:
    t = {"model": name, "tier": "shared"}
    for field in ("lookups", "hits", "round_trips", "bytes_read", "bytes_written", "writes"):
        assert value(samples, f"llmcache_shared_{field}_total", **t) == getattr(sh, field), field
    for field, label in (("refused", "reason"), ("skipped", "reason"), ("write_drops", "reason"), ("errors", "kind")):
        exported = {dict(labels)[label]: v for (n, labels), v in samples.items()
                    if n == f"llmcache_shared_{field}_total" and dict(labels)["model"] == name}
        assert exported == {k: float(v) for k, v in getattr(sh, field).items()}, field
    assert value(samples, "llmcache_shared_latency_seconds_count", **t) == sh.round_trips
    assert value(samples, "llmcache_shared_latency_seconds_sum", **t) == sh.latency_s
    assert value(samples, "llmcache_shared_latency_max_seconds", **t) == sh.latency_max_s
    assert value(samples, "llmcache_shared_queued", **t) == sh.queued
    for quantile in ("p50", "p99"):
        exported = value(samples, f"llmcache_shared_latency_{quantile}_seconds", **t)
        assert (exported is None) == (getattr(sh, f"latency_{quantile}_s") is None)
        assert exported is None or exported >= 0


@pytest.mark.parametrize("url", ["redis://user:s3cret-pw@127.0.0.1:1/0", "redis://127.0.0.1:1/0?password=s3cret-pw"])
def test_credentials_never_scraped(scraper, gen, url):
    pytest.importorskip("redis")
    model = llmcache.accelerate(tiny_model("bert"), shared=llmcache.Shared(url, timeout=0.05))  # nothing listens
    try:
        metrics.register(model, "m", scraper.registry)
        run(model, batch("bert", [5, 6], gen))
        samples = scraper.scrape()
        errors = llmcache.stats(model).shared.errors
        assert errors and sum(errors.values()) == sum(v for (n, _), v in samples.items()
                                                        if n == "llmcache_shared_errors_total")
        assert "s3cret-pw" not in scraper.text
        assert value(samples, "llmcache_shared_up", model="m", tier="shared") == 0
    finally:
        llmcache.disable(model)


def test_semantic_tiers_export(scraper, gen):
    verified = llmcache.accelerate(tiny_model("bert"), semantic=llmcache.Semantic(tolerance=0.9, max_error=0.05))
    threshold = llmcache.accelerate(tiny_model("bert", seed=1), layerwise=llmcache.Layerwise(threshold=0.95))  # CacheStats.tier == "semantic"
    metrics.register(verified, "verified", scraper.registry)
    metrics.register(threshold, "threshold", scraper.registry)
    ids = torch.randint(5, VOCAB, (1, 12), generator=gen).repeat(4, 1)
    ids[:, 6] = torch.randint(5, VOCAB, (4,), generator=gen)  # near duplicates: a neighbour in reach
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    for model in (verified, threshold):
        run(model, {k: v[:2] for k, v in inputs.items()})
        run(model, inputs)
    samples = scraper.scrape()
    check_model(samples, "threshold", llmcache.stats(threshold))
    s = llmcache.stats(verified)
    check_model(samples, "verified", s)
    sem = s.semantic
    for metric, field in (("would_be", "would_be"), ("served", "served"), ("checks", "verified"),
                          ("check_failures", "failed"), ("explored", "explored"),
                          ("explored_failures", "explored_failed"), ("narrowed", "narrowed")):
        assert value(samples, f"llmcache_semantic_{metric}_total", model="verified") == getattr(sem, field), metric
    assert value(samples, "llmcache_semantic_records", model="verified") == sem.records
    for metric in ("error_bound", "realised_bound"):
        exported = [v for (n, labels), v in samples.items() if n == f"llmcache_semantic_{metric}"]
        assert exported == ([] if getattr(sem, metric) is None else [getattr(sem, metric)])  # None: no sample
    assert value(samples, "llmcache_semantic_state", model="verified", state=sem.state, promise=sem.promise) == 1
    for band in sem.bands:
        labels = {"model": "verified", "max_distance": str(band["max_distance"])}
        assert value(samples, "llmcache_semantic_band_would_be", **labels) == band["would_be"]
        assert value(samples, "llmcache_semantic_band_checks", **labels) == band["verified"]
        assert value(samples, "llmcache_semantic_band_serving", **labels) == band["serving"]
        assert value(samples, "llmcache_semantic_band_error_bound", **labels) == band["upper"]
    assert not [n for n, labels in samples if n.startswith("llmcache_semantic_") and ("model", "threshold") in labels
                and n != "llmcache_semantic_hits_total"]  # no verified tier there
