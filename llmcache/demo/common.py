"""What every part of the demo uses: timing on the device, progress bars, a part that cannot run."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager

import torch


class Skipped(Exception):
    """A part that cannot run here (a package or redis-server missing); the message says what to install."""


def sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@contextmanager
def timed(device: str | torch.device, into: list):
    """Appends the seconds the block took (the device's queue drained at both ends) to `into`."""
    sync(device)
    start = time.perf_counter()
    yield
    sync(device)
    into.append(time.perf_counter() - start)


def progress(iterable, desc: str, total: int | None = None):
    """A progress bar on stderr (tqdm: installed with transformers) that disappears when done."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=f"{desc:<22}", total=total, unit="step", file=sys.stderr, leave=False,
                dynamic_ncols=True)


def load(loader, device: str):
    """`loader(device)` from llmcache.models, a missing package turned into Skipped (its message
    names the pip command)."""
    try:
        return loader(device)
    except ModuleNotFoundError as error:
        raise Skipped(str(error)) from error


__all__ = ["Skipped", "load", "progress", "sync", "timed"]
