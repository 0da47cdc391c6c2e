"""What the client-facing tests share: a SIBR-sized SOAP submit, policies shaped like the
operator's (with short windows), and a way to run a client program without blocking the loop.

`bid_set(size)` is a SubmitRawBidSet-like SOAP 1.1 call of about `size` bytes (curl adds
`Expect: 100-continue` to any body over 1 MB; real bid sets reach that). `run(...)` runs a
client program (curl, java, node) as a subprocess while the gateway keeps serving on this loop.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass

SIBR_SUBMIT = "SubmitRawBidSet_SIBRv5_AP"
SIBR_PATH = f"/sst/sibr/{SIBR_SUBMIT}"
TWO_MB = 2 * 1024 * 1024

_BID = (
    "<bid><resource>RES_{n:06d}</resource><marketType>DAM</marketType><hour>{h}</hour>"
    "<segment><mw>{mw}</mw><price>{price}</price></segment></bid>"
)

# SIBR submits limited once a minute: the second call in a test is surely refused (never waited
# for), the first one surely allowed.
SIBR_POLICY = """\
  - name: sibr-submit
    application: SIBR
    services: ["Submit*"]
    limit: 1
    per: 1m
"""

# The operator's two rules, with 2 s windows so a client that waits out Retry-After is quick.
OMS_SHORT = """\
  - name: oms-retrieve
    application: OMS
    services: ["Retrieve*"]
    limit: 1
    per: 2s
"""
DRRS_SHORT = """\
  - name: drrs-per-service
    application: DRRS
    services: ["*"]
    limit: 1
    per: 2s
    reset_on_early_retry: true
    message: >-
      CAISO DRRS Acceptable Use Policy Violation. Please retry your request again in {per}
      seconds from now. Note: Time resets each time you request before expiration.
"""
CRR_SHORT = """\
  - name: crr-portfolio
    application: CRR
    services: ["getPortfolio", "portfolioSubmission"]
    limit: 1
    per: 1m
"""


def policies(*entries: str) -> str:
    return "policies:\n" + "".join(entries)


def bid_set(size: int = TWO_MB) -> bytes:
    """A SOAP 1.1 SubmitRawBidSet envelope of exactly `size` bytes."""
    head = (
        b'<?xml version="1.0" encoding="UTF-8"?>'
        b'<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/">'
        b"<soapenv:Body><SubmitRawBidSet "
        b'xmlns="http://www.caiso.com/soa/2006-09-30/RawBidSet.xsd"><rawBidSet>'
    )
    tail = b"</rawBidSet></SubmitRawBidSet></soapenv:Body></soapenv:Envelope>"
    bids: list[bytes] = []
    length = len(head) + len(tail)
    n = 0
    while True:
        bid = _BID.format(n=n, h=n % 24 + 1, mw=n % 500, price=f"{(n * 7) % 1000}.25").encode()
        if length + len(bid) > size:
            break
        bids.append(bid)
        length += len(bid)
        n += 1
    pad = b" " * (size - length)  # whitespace between elements: still the same document
    return head + b"".join(bids) + pad + tail


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Ran:
    returncode: int
    stdout: str
    stderr: str


async def run(*argv: str, timeout: float = 60.0, cwd: str | None = None) -> Ran:
    """Run a program to completion (killed after `timeout`, a guard against a hang)."""
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=cwd,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        out, err = await process.communicate()
        raise AssertionError(
            f"{argv[0]} did not finish within {timeout}s (hung?)\nstdout: {out.decode()[-2000:]}"
            f"\nstderr: {err.decode()[-2000:]}"
        ) from None
    return Ran(process.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace"))
