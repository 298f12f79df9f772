"""`Semantic`: the error a user accepts from the semantic tier, and how an output is judged against it.

    llmcache.accelerate(model, semantic=llmcache.Semantic(tolerance=0.95, max_error=0.01))

A semantic hit serves a row the final output of a *different* cached row (its neighbour by the
SimHash of the mean token embedding, same length and positions). The promise: among the hits
served, the share whose output is outside `tolerance` of the true one is <= `max_error`, with
probability `confidence` (`verified.SemanticTier` keeps it; `bound` has the statistics).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from .config import is_number, require

POOLINGS = ("mean", "cls")
SERVES = ("states", "pooled")
KINDS = ("label", "next_token")


@dataclass(frozen=True)
class Semantic:
    """What the semantic tier promises, and how hard it explores.

    Attributes:
        tolerance: when a served output counts as right:
            - a float x in (0, 1]: cosine(served, true) >= x of the pooled output (the
              sentence-transformers pooling when a SentenceTransformer is accelerated, else
              `pooling` over the base model's last hidden state);
            - "label": the same argmax of a classification head's logits [B, C];
            - "next_token" (decoders): the same argmax of the causal LM's logits at each row's
              last real token (the token `generate` would pick greedily first; what follows is
              decoded from the neighbour's K/V);
            - a callable (served, true) -> bool on the pooled outputs (float32 [H] each).
        max_error: delta in (0, 1): the share of served hits allowed outside tolerance.
        confidence: in (0, 1): the probability with which the bound holds.
        pooling: "mean" (over real tokens) or "cls" (the first token), for float and callable
            tolerances on a transformers model.
        explore: in (0, 1]: the share of would-be hits in serving neighbourhoods that are computed
            anyway and checked (the promise's running evidence; each costs a miss).
        max_distance: Hamming radius (bits) searched for a neighbour; None: num_bits // 4.
        evidence: a prior from `llmcache.calibrate` on the user's own data: per neighbourhood
            (would-be hits, verified, failed). None: the tier learns from nothing and serves
            nothing until its own checks bound the error.
        serve: "states": a neighbour of the same length and positions serves its states (every
            output of a served row is a real row's, token by token); "pooled": a neighbour of
            any length serves its pooled output at every real token of the row (mean pooling:
            its mean state, "cls": its first token's), so the caller's pooling gives exactly the
            neighbour's pooled output: only for callers that read pooled outputs (sentence
            embeddings; with "label", the head must read the first token: pooling "cls").
    """

    tolerance: float | str | Callable = 0.99
    max_error: float = 0.01
    confidence: float = 0.95
    pooling: str = "mean"
    explore: float = 0.1
    max_distance: int | None = None
    evidence: tuple | None = None
    serve: str = "states"

    def __post_init__(self) -> None:
        t = self.tolerance
        ok = callable(t) or t in KINDS or (is_number(t) and 0.0 < t <= 1.0)
        _require(ok, "tolerance", t, f"a cosine in (0, 1], one of {KINDS}, or a callable (served, true) -> bool")
        _require(is_number(self.max_error) and 0.0 < self.max_error < 1.0, "max_error", self.max_error,
                 "a share in (0, 1), e.g. 0.01")
        _require(is_number(self.confidence) and 0.0 < self.confidence < 1.0, "confidence", self.confidence,
                 "a probability in (0, 1), e.g. 0.95")
        _require(self.pooling in POOLINGS, "pooling", self.pooling, f"one of {POOLINGS}")
        _require(self.serve in SERVES, "serve", self.serve, f"one of {SERVES}")
        _require(not (self.serve == "pooled" and t == "label" and self.pooling != "cls"), "serve", self.serve,
                 "'states' with tolerance 'label', or pooling='cls' (a classification head reads the first token)")
        _require(is_number(self.explore) and 0.0 < self.explore <= 1.0, "explore", self.explore, "a share in (0, 1]")
        _require(self.max_distance is None or (isinstance(self.max_distance, int) and self.max_distance >= 0),
                 "max_distance", self.max_distance, "None or an int >= 0")
        _require(self.evidence is None or (isinstance(self.evidence, tuple) and all(
            isinstance(e, tuple) and len(e) == 3 and all(isinstance(v, int) for v in e) and e[0] >= e[1] >= e[2] >= 0
            for e in self.evidence)), "evidence", self.evidence,
                 "None or a tuple of (would-be hits, verified, failed) per neighbourhood, from llmcache.calibrate")

    def replace(self, **fields) -> Semantic:
        """This promise with `fields` changed (checked again)."""
        return dataclasses.replace(self, **fields)

    @property
    def alpha(self) -> float:
        return 1.0 - self.confidence

    @property
    def kind(self) -> str:
        """What is read from an output: "label", "next_token" or "embedding" (floats and callables)."""
        return self.tolerance if self.tolerance in KINDS else "embedding"

    def describe(self) -> str:
        t = self.tolerance
        what = {"label": "same label", "next_token": "same next token"}.get(t) if t in KINDS else (
            f"cosine >= {t}" if is_number(t) else getattr(t, "__name__", "callable"))
        return f"{what}, max_error {self.max_error:g} at confidence {self.confidence:g}"

    def check_model(self, model, base) -> None:
        """Refuse a tolerance that does not fit `model` (the one accelerated), naming the argument."""
        name = type(model).__name__
        if self.tolerance == "label" and (
                model is base or not name.endswith(("ForSequenceClassification", "ForImageClassification"))):
            raise ValueError(f"Semantic.tolerance = 'label' needs a classification head, and {name} has none: "
                             "accelerate a *ForSequenceClassification model, or use a cosine tolerance")
        if self.tolerance == "next_token" and (model is base or not name.endswith(("ForCausalLM", "LMHeadModel"))):
            raise ValueError(f"Semantic.tolerance = 'next_token' needs a language-model head, and {name} has none: "
                             "accelerate the *ForCausalLM model")

    # ---- judging outputs ---------------------------------------------------------------
    def read(self, output, mask: torch.Tensor) -> torch.Tensor:
        """What the tolerance judges, per row: labels int64 [B], or pooled outputs float32 [B, H]
        (`output` the accelerated model's, `mask` [B, T] the call's attention mask)."""
        if self.kind == "label":
            return _field(output, "logits").argmax(-1)
        if self.kind == "next_token":
            logits = _field(output, "logits")
            if logits.shape[1] == mask.shape[1]:  # every position: each row's last real one
                last = (mask.to(logits.device) != 0).long().cumsum(1).argmax(1)
                return logits[torch.arange(logits.shape[0], device=logits.device), last].argmax(-1)
            return logits[:, -1].argmax(-1)  # logits_to_keep=1 (generate's prefill), left padding
        if isinstance(output, Mapping) and "sentence_embedding" in output:  # a SentenceTransformer's features
            return output["sentence_embedding"].detach().float()
        hidden = _field(output, "last_hidden_state").detach().float()
        if self.pooling == "cls":
            return hidden[:, 0]
        m = mask.to(hidden.device, hidden.dtype).unsqueeze(-1)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)

    def agree(self, served: torch.Tensor, true: torch.Tensor) -> list[bool]:
        """Per row: is `served` within tolerance of `true` (both from `read`, [N, ...])?"""
        t = self.tolerance
        if t in KINDS:
            return (served == true).tolist()
        if callable(t):
            return [bool(t(s, r)) for s, r in zip(served, true)]
        return (torch.nn.functional.cosine_similarity(served, true, dim=-1) >= t).tolist()


def _field(output, name: str):
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        return output[name]
    value = getattr(output, name, None)
    return value if value is not None else output[0]


def _require(ok: bool, name: str, value, allowed: str) -> None:
    require(ok, name, value, allowed, "Semantic")
