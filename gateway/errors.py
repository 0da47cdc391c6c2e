"""The gateway's error hierarchy (one root, a few specific children) and the result codes its
own answers carry."""

from __future__ import annotations

from enum import StrEnum


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


class ErrorCode(StrEnum):
    """Every result code the gateway sends in its own answers (SOAP `Event/result`, JSON
    `code`), with the status each names. SOAP faults travel on their binding's status unless the
    application says `fault_statuses: http` (faults.status_for). The README lists them."""

    VIOLATION = "AUP-VIOLATION"  # 429 (by default 500 SOAP 1.1, 400 SOAP 1.2)
    UNKNOWN_APPLICATION = "AUP-UNKNOWN-APPLICATION"  # 404
    UNKNOWN_SERVICE = "AUP-UNKNOWN-SERVICE"  # 404
    BAD_METHOD = "AUP-BAD-METHOD"  # 405
    BAD_PATH = "AUP-BAD-PATH"  # 400
    BAD_XML = "AUP-BAD-XML"  # 400: the SOAP message is not well-formed
    UNSAFE_XML = "AUP-UNSAFE-XML"  # 400: DTDs, entities
    BAD_REQUEST = "AUP-BAD-REQUEST"  # 400: not valid HTTP/1.1
    NO_CERTIFICATE = "AUP-NO-CERTIFICATE"  # 403: the connection presented no certificate
    NOT_PROVISIONED = "AUP-NOT-PROVISIONED"  # 403
    BODY_TOO_LARGE = "AUP-BODY-TOO-LARGE"  # 413
    URI_TOO_LONG = "AUP-URI-TOO-LONG"  # 414
    HEADER_TOO_LARGE = "AUP-HEADER-TOO-LARGE"  # 431
    TOO_MANY_HEADERS = "AUP-TOO-MANY-HEADERS"  # 431
    TOO_MANY_CONNECTIONS = "AUP-TOO-MANY-CONNECTIONS"  # 429
    REQUEST_TIMEOUT = "AUP-REQUEST-TIMEOUT"  # 408
    HTTP_VERSION = "AUP-HTTP-VERSION"  # 505
    UPSTREAM_UNAVAILABLE = "AUP-UPSTREAM-UNAVAILABLE"  # 502
    UPSTREAM_TIMEOUT = "AUP-UPSTREAM-TIMEOUT"  # 504
    STORE_UNAVAILABLE = "AUP-STORE-UNAVAILABLE"  # 503
