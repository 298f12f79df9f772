"""The shared tier: exact entries in Redis, behind every replica's device bank.

`settings.Shared` says where and how; `values` what is written and how it is checked; `tier`
the client (batched lookups, background writer, circuit breaker) and its `SharedStats`.
"""

from .settings import Shared
from .tier import SharedStats, SharedTier, worth_looking_up

__all__ = ["Shared", "SharedStats", "SharedTier", "worth_looking_up"]
