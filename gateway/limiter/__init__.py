"""Limiters: the Limiter protocol, its Decision, and the backends behind it."""

from __future__ import annotations

from gateway.limiter.base import Decision, KeyState, Limiter, Rate, limiter_key
from gateway.limiter.memory import MemoryLimiter

__all__ = ["Decision", "KeyState", "Limiter", "MemoryLimiter", "Rate", "limiter_key"]
