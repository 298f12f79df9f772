"""Checksums of what `llmcache.save` writes: BLAKE2b over the model fingerprint and the bytes."""

from __future__ import annotations

import hashlib

import numpy as np
import torch


def checksum(fingerprint: bytes, *parts) -> np.ndarray:
    """uint8 [16]: BLAKE2b of the fingerprint and `parts` (bytes-like), in order."""
    digest = hashlib.blake2b(fingerprint, digest_size=16)
    for part in parts:
        digest.update(part)
    return np.frombuffer(digest.digest(), dtype=np.uint8)


def raw(t: torch.Tensor) -> np.ndarray:
    """A tensor's bytes as uint8 [rows, bytes per row] on the host (any dtype, bfloat16 included)."""
    t = t.detach().contiguous().cpu()
    return t.reshape(t.shape[0], -1).view(torch.uint8).numpy() if t.dim() else t.reshape(1).view(torch.uint8).numpy()
