"""Limiters: the Limiter protocol, its Decision, and the backends behind it."""

from __future__ import annotations

from gateway.limiter.base import Decision, KeyState, Limiter, Rate, limiter_key
from gateway.limiter.factory import limiter_from_url
from gateway.limiter.fallback import ResilientLimiter, Source, StoreState
from gateway.limiter.memory import MemoryLimiter
from gateway.limiter.redis import RedisLimiter

__all__ = [
    "Decision",
    "KeyState",
    "Limiter",
    "MemoryLimiter",
    "Rate",
    "RedisLimiter",
    "ResilientLimiter",
    "Source",
    "StoreState",
    "limiter_from_url",
    "limiter_key",
]
