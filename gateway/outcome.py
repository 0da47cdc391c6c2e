"""What happened to one call: the value the handler fills in and every observer (access log,
metrics, ledger, history) reads. Nothing here depends on how the call was served."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

from gateway.edge.identity import ClientIdentity

# A policy's violation: rejected (enforced), or shadow (it would have been rejected). These are
# what the metrics count as violations and the ledger records as episodes.
Violation = Literal["rejected", "shadow"]
VIOLATIONS: frozenset[Violation] = frozenset(get_args(Violation))
# forwarded: no policy applied; allowed / rejected / shadow: a policy decided; exempt: an
# override exempts the identity; refused: no route or no access; status: the caller asked for
# its own AUP status (proxy/status.py), never counted as a call.
CallDecision = Literal["forwarded", "allowed", Violation, "exempt", "refused", "status"]


@dataclass(slots=True)
class Outcome:
    """What happened to one call, for the access log, metrics and the ledger."""

    request_id: str
    identity: ClientIdentity | None
    application: str = ""
    service: str = ""
    decision: CallDecision = "forwarded"
    policy: str = ""
    key: str = ""  # the limiter key the decision was made on (empty: no limiter asked)
    status: int = 0
    upstream_status: int = 0
    upstream_failed: bool = False  # forwarded, but no answer came (unreachable or too slow)
    retry_after: float = 0.0
    store_time: float = 0.0  # the limiter's clock at the decision (Redis TIME with Redis)
    fallback: bool = False  # decided without the store (on_store_error), for the ledger
    elapsed: float = 0.0
    store_latency: float = 0.0  # seconds spent in the limiter (0: not asked)
    upstream_latency: float = 0.0  # seconds spent forwarding and relaying (0: not forwarded)
    method: str = ""  # the request's, for the access log (replay matches policies' methods)


Observer = Callable[[Outcome], None]
