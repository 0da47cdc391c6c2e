"""The gateway's error hierarchy: one root, a few specific children."""

from __future__ import annotations


class GatewayError(Exception):
    """Root of every error the gateway raises on purpose."""


class ConfigError(GatewayError):
    """Invalid configuration or policy YAML; carries every problem found, each with file:line."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class UpstreamError(GatewayError):
    """The upstream service could not be reached or did not answer in time."""

    def __init__(self, status: int, reason: str) -> None:
        self.status = status
        self.reason = reason
        super().__init__(reason)


class StoreUnavailable(GatewayError):
    """The shared limiter store (Redis) could not answer in time."""
