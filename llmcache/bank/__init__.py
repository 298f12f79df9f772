"""Storage of the exact tier: a paged arena of states on the model's device and its host index."""

from .arena import PagedArena
from .index import ExactIndex
from .native import NativeIndex, new_index

__all__ = ["ExactIndex", "NativeIndex", "PagedArena", "new_index"]
