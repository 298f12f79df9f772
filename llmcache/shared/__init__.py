"""The shared tier: exact entries in Redis, behind every replica's device bank: encoders' whole
rows and decoders' prefix pages (keyed by hashes chained over the prefix, so a page means the
same in every process).

`settings.Shared` says where and how; `values` what is written and how it is checked; `reads`
the lookups (rows in one MGET, pages as chains); `tier` the client (background writer, circuit
breaker) and its `SharedStats`.
"""

from .settings import Shared
from .tier import SharedStats, SharedTier, worth_looking_up

__all__ = ["Shared", "SharedStats", "SharedTier", "worth_looking_up"]
