"""Prometheus metrics: everything `llmcache.stats(model)` reports, per model, layer and tier.

    from llmcache import metrics
    metrics.register(model, "minilm")             # into prometheus_client.REGISTRY
    prometheus_client.start_http_server(9100)     # GET http://host:9100/metrics
    metrics.unregister("minilm")

Needs `prometheus_client` (`pip install llmcache[shared]`); `import llmcache` does not import it.
Every scrape reads a fresh `stats(model)` of each model registered in that registry. Models are
held by weak reference: one garbage-collected or no longer accelerated is left out, silently.
Counters (`_total`) count since `accelerate` or `reset` (a reset reads as a counter reset).

Labels: `model` (the registered name) everywhere; `layer` and `tier` (CacheStats.tier, "exact" or
"semantic") on llmcache_layer_*; `tier="shared"` on llmcache_shared_*. The metrics (`_METRICS`):
- model: llmcache_{forwards,rows,lookups,hits,exact_hits,semantic_hits,repeats,prefix_rows,
  tokens_served,tokens_computed,insertions,evictions,invalidations}_total,
  llmcache_{fingerprint,lookup}_seconds_total, llmcache_not_cached_rows_total{reason};
  gauges llmcache_{entries,bytes,bytes_reserved,hit_rate,last_semantic_rows},
  llmcache_last_tokens{kind="served"|"computed"}.
- layer: llmcache_layer_{lookups,hits,exact_hits,semantic_hits,insertions,evictions}_total,
  llmcache_layer_{fingerprint,lookup}_seconds_total; gauges llmcache_layer_{bytes,hit_rate}.
  The exact tier reports the model's counts at every cached block (as CacheStats.layers does):
  do not sum those over layers.
- verified semantic tier (CacheStats.semantic): llmcache_semantic_{would_be,served,checks,
  check_failures,explored,explored_failures,narrowed}_total; gauges llmcache_semantic_records,
  llmcache_semantic_{error,realised}_bound (no sample while never measured),
  llmcache_semantic_state{state,promise} = 1, and per band{max_distance}
  llmcache_semantic_band_{would_be,checks,failures,serving,error_bound} (with the prior's evidence).
- shared tier (CacheStats.shared): llmcache_shared_{lookups,hits,round_trips,bytes_read,
  bytes_written,writes}_total, llmcache_shared_{refused,skipped,write_drops}_total{reason},
  llmcache_shared_errors_total{kind}; summary llmcache_shared_latency_seconds (count: round
  trips, sum: their wall time); gauges llmcache_shared_latency_{p50,p99,max}_seconds,
  llmcache_shared_{queued,hit_rate,retry_in_seconds,compute_seconds_per_token,round_trip_seconds}
  (no sample while None), llmcache_shared_up (1: state "up", else 0) and
  llmcache_shared_state{state,url} = 1, url without user, password or query.
"""

from __future__ import annotations

import threading
import weakref
from urllib.parse import urlsplit

import prometheus_client
from prometheus_client.core import CounterMetricFamily as C
from prometheus_client.core import GaugeMetricFamily as G
from prometheus_client.core import SummaryMetricFamily as S
from prometheus_client.registry import Collector

from . import api, report

_METRICS = {  # name after "llmcache_": (family, help)
    "forwards": (C, "Base-model calls seen by the cache, cached or not"),
    "rows": (C, "Batch rows seen by the cache, cached or not"),
    "lookups": (C, "Rows looked up (semantic tier: summed over layers)"),
    "hits": (C, "Rows served from a bank: exact_hits + semantic_hits (semantic tier: summed over layers)"),
    "exact_hits": (C, "Rows served an equal row's states"),
    "semantic_hits": (C, "Rows served a neighbour's states (threshold or verified semantic tier)"),
    "repeats": (C, "Rows repeating an earlier row of their own batch (copied: neither served nor computed)"),
    "prefix_rows": (C, "Decoder rows that computed only their tokens after a cached prefix"),
    "tokens_served": (C, "Real tokens whose states came from the bank"),
    "tokens_computed": (C, "Real tokens computed in cached forwards"),
    "insertions": (C, "Entries inserted"),
    "evictions": (C, "Entries evicted"),
    "invalidations": (C, "Times the weights changed and every entry was dropped"),
    "fingerprint_seconds": (C, "Host wall time fingerprinting (on CUDA it counts launches, not kernels)"),
    "lookup_seconds": (C, "Host wall time in lookups (on CUDA it counts launches, not kernels)"),
    "entries": (G, "Entries held (a decoder's: pages of token prefixes)"),
    "bytes": (G, "Bytes of the states the entries hold"),
    "bytes_reserved": (G, "Bytes the banks have allocated"),
    "hit_rate": (G, "hits / rows (semantic tier: / rows x cached layers)"),
    "not_cached_rows": (C, "Rows that ran uncached, by reason"),
    "last_tokens": (G, "Real tokens of the last cached forward, served / computed"),
    "last_semantic_rows": (G, "Rows of the last routed forward served a neighbour's output"),
    "layer_lookups": (C, "Rows this layer looked up"),
    "layer_hits": (C, "Rows this layer served from its bank"),
    "layer_exact_hits": (C, "Rows this layer served an equal row's output"),
    "layer_semantic_hits": (C, "Rows this layer served a neighbour's output"),
    "layer_insertions": (C, "Entries this layer inserted"),
    "layer_evictions": (C, "Entries this layer evicted"),
    "layer_fingerprint_seconds": (C, "Host wall time this layer spent fingerprinting"),
    "layer_lookup_seconds": (C, "Host wall time this layer spent in lookups"),
    "layer_bytes": (G, "Bytes this layer's bank holds"),
    "layer_hit_rate": (G, "This layer's hits / lookups"),
    "semantic_would_be": (C, "Rows that missed the exact tier with a neighbour in reach (with the prior's)"),
    "semantic_served": (C, "Semantic hits served"),
    "semantic_checks": (C, "Would-be hits computed and judged against the tolerance in this run"),
    "semantic_check_failures": (C, "Checks outside the tolerance"),
    "semantic_explored": (C, "Checks drawn among hits that would have been served"),
    "semantic_explored_failures": (C, "Explored checks outside the tolerance"),
    "semantic_narrowed": (C, "Times a failed check narrowed a neighbour's reach"),
    "semantic_records": (G, "Rows held as neighbours"),
    "semantic_error_bound": (G, "Upper bound on the served hits' error share (admission)"),
    "semantic_realised_bound": (G, "Upper bound on the error share from the explored sample"),
    "semantic_state": (G, "1 for the tier's state: learning, serving or stopped"),
    "semantic_band_would_be": (G, "Would-be hits within this band's max_distance (with the prior's)"),
    "semantic_band_checks": (G, "Checks in the bound's sample of this band (with the prior's)"),
    "semantic_band_failures": (G, "Of them, outside the tolerance"),
    "semantic_band_serving": (G, "1 when this band serves"),
    "semantic_band_error_bound": (G, "Upper bound on the error share of distance <= max_distance"),
    "shared_lookups": (C, "Rows looked up in Redis"),
    "shared_hits": (C, "Rows served from Redis (copied into the device bank)"),
    "shared_round_trips": (C, "Lookups sent to Redis (one per forward at most)"),
    "shared_bytes_read": (C, "Value bytes received from Redis"),
    "shared_bytes_written": (C, "Value bytes sent to Redis"),
    "shared_writes": (C, "Entries written to Redis"),
    "shared_refused": (C, "Values found in Redis and not served, by reason"),
    "shared_skipped": (C, "Rows not looked up, by reason (down: breaker open, not_worth: by the estimate)"),
    "shared_write_drops": (C, "Computed entries not written, by reason"),
    "shared_errors": (C, "Failed round trips, by kind"),
    "shared_latency_seconds": (S, "Wall time of the lookups sent to Redis"),
    "shared_latency_p50_seconds": (G, "Median of the last 1024 lookups' wall time"),
    "shared_latency_p99_seconds": (G, "99th percentile of the last 1024 lookups' wall time"),
    "shared_latency_max_seconds": (G, "Longest lookup wall time"),
    "shared_queued": (G, "Entries waiting for the writer"),
    "shared_hit_rate": (G, "Shared hits / shared lookups"),
    "shared_retry_in_seconds": (G, "Seconds until the open breaker lets a lookup probe the server"),
    "shared_compute_seconds_per_token": (G, "Estimated compute per token, for lookup='auto'"),
    "shared_round_trip_seconds": (G, "Estimated round trip, for lookup='auto'"),
    "shared_up": (G, "1 when the shared tier is up, 0 when down or probing"),
    "shared_state": (G, "1 for the shared tier's state: up, down or probing"),
}
_MODEL = ("forwards", "rows", "lookups", "hits", "exact_hits", "semantic_hits", "repeats", "prefix_rows",
          "tokens_served", "tokens_computed", "insertions", "evictions", "invalidations", "fingerprint_seconds",
          "lookup_seconds", "entries", "bytes", "bytes_reserved", "hit_rate")
_LAYER = ("lookups", "hits", "exact_hits", "semantic_hits", "insertions", "evictions", "fingerprint_seconds",
          "lookup_seconds", "bytes", "hit_rate")
_SEMANTIC = ("would_be", "served", "checks", "check_failures", "explored", "explored_failures", "narrowed",
             "records", "error_bound", "realised_bound")
_SHARED = ("lookups", "hits", "round_trips", "bytes_read", "bytes_written", "writes", "latency_p50_seconds",
           "latency_p99_seconds", "latency_max_seconds", "queued", "hit_rate", "retry_in_seconds",
           "compute_seconds_per_token", "round_trip_seconds")
_BY = {"refused": "reason", "skipped": "reason", "write_drops": "reason", "errors": "kind"}  # SharedStats dicts
_FIELD = {"checks": "verified", "check_failures": "failed", "explored_failures": "explored_failed"}


class _Families(dict):
    """Metric families by name, each holding the samples of every model."""

    def add(self, name: str, labels: dict, *value) -> None:
        family = self.get(name)
        if family is None:
            kind, doc = _METRICS[name]
            family = self[name] = kind("llmcache_" + name, doc, labels=list(labels))
        family.add_metric(list(labels.values()), *value)

    def fields(self, prefix: str, names: tuple, stats, labels: dict) -> None:
        """One sample per field of `stats` (name's "seconds" read as "s"); None: no sample."""
        for name in names:
            value = getattr(stats, _FIELD.get(name, name.replace("seconds", "s")))
            if value is not None:
                self.add(prefix + name, labels, value)


def _where(url: str) -> str:
    """scheme://host:port/db of a Redis URL: never its user, password or query (which may hold one)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        host = (f"[{host}]" if ":" in host else host) + (f":{parts.port}" if parts.port is not None else "")
    except ValueError:
        return ""
    return f"{parts.scheme}://{host}{parts.path}"


def _export(out: _Families, name: str, s: report.CacheStats) -> None:
    """The samples of one model's snapshot `s`, registered as `name`."""
    m = {"model": name}
    out.fields("", _MODEL, s, m)
    for reason, rows in sorted(s.not_cached.items()):
        out.add("not_cached_rows", {**m, "reason": reason}, rows)
    for kind, tokens in zip(("served", "computed"), s.last_tokens):
        out.add("last_tokens", {**m, "kind": kind}, tokens)
    out.add("last_semantic_rows", m, len(s.last_semantic_rows))
    for layer in s.layers:
        out.fields("layer_", _LAYER, layer, {**m, "layer": str(layer.layer), "tier": s.tier})
    if s.semantic is not None:
        out.fields("semantic_", _SEMANTIC, s.semantic, m)
        out.add("semantic_state", {**m, "state": s.semantic.state, "promise": s.semantic.promise}, 1)
        for band in s.semantic.bands:
            b = {**m, "max_distance": str(band["max_distance"])}
            for metric, key in (("would_be", "would_be"), ("checks", "verified"), ("failures", "failed"),
                                ("serving", "serving"), ("error_bound", "upper")):
                if band[key] is not None:
                    out.add("semantic_band_" + metric, b, float(band[key]))
    if s.shared is not None:
        sh, t = s.shared, {**m, "tier": "shared"}
        out.fields("shared_", _SHARED, sh, t)
        for field, label in _BY.items():
            for key, count in sorted(getattr(sh, field).items()):
                out.add("shared_" + field, {**t, label: key}, count)
        out.add("shared_latency_seconds", t, sh.round_trips, sh.latency_s)
        out.add("shared_up", t, 1 if sh.state == "up" else 0)
        out.add("shared_state", {**t, "state": sh.state, "url": _where(sh.url)}, 1)


class StatsCollector(Collector):
    """The models registered in one registry; `collect()` reads a fresh `stats` of each."""

    def __init__(self):
        self.lock = threading.Lock()
        self.models: dict[str, weakref.ref] = {}

    def live(self) -> dict:
        """name -> model of the registered models still alive (the others are forgotten)."""
        with self.lock:
            alive = {name: ref() for name, ref in self.models.items()}
            for name in [name for name, model in alive.items() if model is None]:
                del self.models[name]
        return {name: model for name, model in alive.items() if model is not None}

    def describe(self) -> list:
        """Every family this collector may export, without samples (for the registry's name checks)."""
        return [kind("llmcache_" + name, doc) for name, (kind, doc) in _METRICS.items()]

    def collect(self) -> list:
        out = _Families()
        for name, model in self.live().items():
            if api.is_accelerated(model):
                _export(out, name, report.stats(model))
        return list(out.values())


_COLLECTORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # registry -> its StatsCollector
_LOCK = threading.Lock()


def register(model, name: str, registry=None) -> StatsCollector:
    """Export `llmcache.stats(model)` under the label model=`name` in `registry` (default
    `prometheus_client.REGISTRY`) from the next scrape on; returns the registry's collector."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"metrics.register: name must be a non-empty str (the model label), got {name!r}")
    if not api.is_accelerated(model):
        raise ValueError("metrics.register: this model is not accelerated: call llmcache.accelerate(model) first")
    registry = prometheus_client.REGISTRY if registry is None else registry
    with _LOCK:
        collector = _COLLECTORS.get(registry)
        if collector is None:
            collector = StatsCollector()
            registry.register(collector)
            _COLLECTORS[registry] = collector
    with collector.lock:
        held = collector.models.get(name)
        if held is not None and held() is not None:
            raise ValueError(f"metrics.register: a model named {name!r} is already registered in this registry: "
                             f"call metrics.unregister({name!r}) first or pick another name")
        collector.models[name] = weakref.ref(model)
    return collector


def unregister(model_or_name, registry=None) -> None:
    """Stop exporting a model, given by its registered name or itself (all its names)."""
    collector = _COLLECTORS.get(prometheus_client.REGISTRY if registry is None else registry)
    live = collector.live() if collector is not None else {}
    names = [model_or_name] if isinstance(model_or_name, str) else [n for n, m in live.items() if m is model_or_name]
    if not names or names[0] not in live:
        shown = repr(model_or_name) if isinstance(model_or_name, str) else "this model"
        raise ValueError(f"metrics.unregister: {shown} is not registered in this registry "
                         f"(registered: {sorted(live) or 'none'})")
    with collector.lock:
        for name in names:
            collector.models.pop(name, None)


__all__ = ["StatsCollector", "register", "unregister"]
