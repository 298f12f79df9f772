"""Shared fixtures: a fresh random generator per test (a new seed each run, printed on failure;
TEST_SEED=<seed> replays one)."""

import os
import random

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Without a GPU, Triton runs only under its interpreter, and the switch must be set before
# anything imports triton (transformers does, at model import), or triton.language's own
# helpers stay compiled-only. torch itself does not import triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def gen(request):
    seed = int(os.environ.get("TEST_SEED") or random.SystemRandom().randrange(2**31))
    request.node.user_properties.append(("seed", seed))
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)


def random_codes(rows: int, words: int, gen: torch.Generator, sparse: bool = False) -> torch.Tensor:
    """int64 [rows, words] of random bits; sparse codes (few bits set) make many distance ties."""
    codes = torch.randint(-(2**63), 2**63 - 1, (rows, words), dtype=torch.int64, generator=gen)
    if sparse:
        for _ in range(3):
            codes &= torch.randint(-(2**63), 2**63 - 1, (rows, words), dtype=torch.int64, generator=gen)
    return codes


from redis_server import redis_server  # noqa: F401  (the fixture: a real redis-server per test)
