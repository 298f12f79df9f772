"""The exact tier: rows (and decoder pages) served bit for bit from what an equal row computed."""

from .embed import Embeddings
from .remote import Remote
from .store import Store
from .tier import ExactTier

__all__ = ["Embeddings", "ExactTier", "Remote", "Store"]
