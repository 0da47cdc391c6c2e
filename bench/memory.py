"""Memory held per identity after 100,000 distinct identities have called the gateway.

Making 100,000 TLS connections with 100,000 client certificates is too slow for a bench, so the
per-identity state is built in-process, the way the handler builds it, from real certificates:
100,000 distinct client certificates (one CA, one key pair, distinct subjects) are made first;
then for each one, as on a call: `IdentityCache.get(der)` (certificate -> ClientIdentity, the
cache keeps the newest 10,000), `limiter_key(...)`, and one memory-store decision under OMS's
rule (1 call per 5 s, so every key is live at the end). TLS connection state is not per identity
(it goes when the connection closes), so it is left out.

Reported: VmRSS growth of this process across the calls (what the OS sees, allocator slack
included), and tracemalloc's count of live Python bytes in the identity cache and the limiter
(a second pass over the same certificates, since tracing slows and inflates the first).
Run as `python -m bench.memory [N]` in a fresh process; prints one JSON object.
"""

from __future__ import annotations

import datetime as dt
import gc
import json
import sys
import time
import tracemalloc
from array import array

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bench.procs import rss_kib
from gateway.demo.certs import participant_subject
from gateway.edge.identity import IdentityCache
from gateway.limiter.base import Rate, limiter_key
from gateway.limiter.memory import MemoryLimiter

SERVICE = "RetrieveCurrentOutages_OMSv1_AP"
OMS = Rate(1, 5.0)


def certificates(count: int) -> tuple[bytes, array[int]]:
    """`count` distinct client certificates (DER) in one blob, and where each one ends.

    One blob rather than a list, so the certificates themselves do not count as held state:
    slicing gives each call a fresh `bytes`, as a TLS connection does.
    """
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "AUP Bench CA")])
    public = ec.generate_private_key(ec.SECP256R1()).public_key()
    blob = bytearray()
    ends: array[int] = array("Q")
    for i in range(count):
        cert = (
            x509.CertificateBuilder()
            .subject_name(participant_subject(f"user{i:07d}"))
            .issuer_name(ca_name)
            .public_key(public)
            .serial_number(i + 1)
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .sign(ca_key, hashes.SHA256())
        )
        blob += cert.public_bytes(serialization.Encoding.DER)
        ends.append(len(blob))
    return bytes(blob), ends


def _calls(
    blob: bytes, ends: array[int], cache: IdentityCache, limiter: MemoryLimiter, t: float
) -> None:
    start = 0
    for end in ends:
        identity = cache.get(blob[start:end])
        limiter.decide_now(limiter_key(identity.key("subject"), "OMS", SERVICE), OMS, t)
        start = end


def measure(count: int) -> dict[str, object]:
    made = time.perf_counter()
    blob, ends = certificates(count)
    made = time.perf_counter() - made
    t = time.time()

    gc.collect()
    before = rss_kib_self()
    cache, limiter = IdentityCache(), MemoryLimiter()
    started = time.perf_counter()
    _calls(blob, ends, cache, limiter, t)
    elapsed = time.perf_counter() - started
    gc.collect()
    after = rss_kib_self()
    assert len(limiter) == count
    del cache, limiter
    gc.collect()

    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    cache, limiter = IdentityCache(), MemoryLimiter()
    start = 0
    for end in ends:
        cache.get(blob[start:end])
        start = end
    with_cache = tracemalloc.get_traced_memory()[0]
    _calls(blob, ends, IdentityCache(1), limiter, t)  # keys only: the cache is counted above
    with_limiter = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    cached = len(cache._items)
    return {
        "identities": count,
        "certificates_seconds": round(made, 1),
        "calls_seconds": round(elapsed, 2),
        "us_per_call": round(elapsed / count * 1e6, 2),
        "rss_before_kib": before,
        "rss_after_kib": after,
        "rss_growth_bytes_per_identity": round((after - before) * 1024 / count, 1),
        "identity_cache_entries": cached,
        "identity_cache_bytes": with_cache - base,
        "identity_cache_bytes_per_entry": round((with_cache - base) / cached, 1),
        "limiter_bytes": with_limiter - with_cache,
        "limiter_bytes_per_key": round((with_limiter - with_cache) / count, 1),
    }


def rss_kib_self() -> int:
    import os

    return rss_kib(os.getpid())


if __name__ == "__main__":
    print(json.dumps(measure(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000)))
