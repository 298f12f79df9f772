"""The cache's tiers, each one implementation of `base.Tier` (see base.py for the protocol)."""

from .base import Call, Route, Tier

__all__ = ["Call", "Route", "Tier"]
