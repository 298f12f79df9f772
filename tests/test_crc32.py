"""`crc32_copy` (csrc/cpu/crc32.cpp): zlib's CRC-32 of a buffer, folded with carry-less
multiplication, and the buffer copied in the same pass; the shared tier checks fetched values with
it. Equal to zlib.crc32 on every length (the folded lanes, the bytes after them, short buffers
that never fold) and from any starting value."""

import zlib

import numpy as np
import pytest

import llmcache
from llmcache.ops._library import extension

pytestmark = pytest.mark.skipif(not llmcache.build_info()["extension"], reason="the host op needs the extension")

LENGTHS = [*range(130), 1023, 4095, 4096, 4097, 387 * 1024 + 5]


@pytest.mark.parametrize("n", LENGTHS, ids=[f"N{n}" for n in LENGTHS])
def test_equals_zlib_and_copies(n):
    rng = np.random.default_rng(n)
    data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    for start in (0, 0xDEADBEEF):
        out = np.zeros(n + 3, dtype=np.uint8)
        assert extension().crc32_copy(data, out, start) == zlib.crc32(data, start)
        assert out[:n].tobytes() == data and not out[n:].any()
        assert extension().crc32_copy(memoryview(data)[1:], None, start) == zlib.crc32(data[1:], start)


def test_arguments_are_checked():
    data = bytes(100)
    with pytest.raises(RuntimeError, match="at least as many bytes"):
        extension().crc32_copy(data, np.zeros(99, dtype=np.uint8), 0)
    with pytest.raises(RuntimeError, match="contiguous"):
        extension().crc32_copy(np.zeros((10, 20), dtype=np.uint8)[:, ::2], None, 0)
