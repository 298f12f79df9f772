"""Storage of the exact tier: a paged arena of states on the model's device and its host index."""

from .arena import PagedArena
from .index import ExactIndex

__all__ = ["ExactIndex", "PagedArena"]
