"""llmcache.ops: the kernels behind the cache, one public function per op.

Every op runs on CPU (C++), CUDA (.cu), Triton, or the pure-PyTorch `reference`; see
`_library` for how one is chosen and forced.
"""

from . import reference
from ._library import BACKENDS, available_backends
from .chain_hash import chain_hash
from .gather_with_mask import gather_with_mask
from .hamming_topk import hamming_radius, hamming_topk
from .read_rows import read_rows
from .simhash import random_planes, simhash, simhash_pooled
from .write_rows import write_rows

__all__ = [
    "BACKENDS",
    "available_backends",
    "chain_hash",
    "gather_with_mask",
    "hamming_radius",
    "hamming_topk",
    "random_planes",
    "read_rows",
    "reference",
    "simhash",
    "simhash_pooled",
    "write_rows",
]
