"""Verified peer certificate -> ClientIdentity (subject DN, CN, organisation, fingerprint).

Parsing X.509 is not free, so identities are cached by the certificate's DER bytes; the cache
is bounded and holds only certificates that already passed the TLS handshake.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Literal, get_args

from cryptography import x509
from cryptography.x509.oid import NameOID

IdentityMode = Literal["subject", "fingerprint", "cn"]
IDENTITY_MODES: tuple[IdentityMode, ...] = get_args(IdentityMode)
_SPLIT = re.compile(r"(?<!\\),")
_CACHE_SIZE = 10_000


@dataclass(frozen=True, slots=True)
class ClientIdentity:
    subject: str
    cn: str
    organisation: str
    fingerprint: str
    xfcc: str  # the Envoy-style X-Forwarded-Client-Cert value the upstream receives

    def key(self, mode: IdentityMode) -> str:
        """The string that limiter keys are built from."""
        if mode == "fingerprint":
            return self.fingerprint
        if mode == "cn":
            return self.cn
        return self.subject


def normalise_dn(text: str) -> str:
    """`cn = jdoex1234, ou=people,O=CAISO , C=US` -> `CN=jdoex1234,OU=people,O=CAISO,C=US`.

    Attribute names are upper-cased and whitespace around separators dropped; the order is kept
    (it is the order the operator writes user names in), and values keep their case.
    """
    parts = []
    for rdn in _SPLIT.split(text.strip()):
        name, sep, value = rdn.partition("=")
        if not sep:
            raise ValueError(f"{text!r} is not a distinguished name (expected CN=...,O=...)")
        parts.append(f"{name.strip().upper()}={value.strip()}")
    return ",".join(parts)


def _first(name: x509.Name, oid: x509.ObjectIdentifier) -> str:
    attrs = name.get_attributes_for_oid(oid)
    return str(attrs[0].value) if attrs else ""


def identity_from_der(der: bytes) -> ClientIdentity:
    cert = x509.load_der_x509_certificate(der)
    subject = normalise_dn(cert.subject.rfc4514_string())
    fingerprint = hashlib.sha256(der).hexdigest()
    xfcc = 'Hash={};Subject="{}"'.format(fingerprint, subject.replace('"', '\\"'))
    return ClientIdentity(
        subject=subject,
        cn=_first(cert.subject, NameOID.COMMON_NAME),
        organisation=_first(cert.subject, NameOID.ORGANIZATION_NAME),
        fingerprint=fingerprint,
        xfcc=xfcc,
    )


class IdentityCache:
    """DER bytes -> ClientIdentity, bounded (oldest dropped first)."""

    def __init__(self, size: int = _CACHE_SIZE) -> None:
        self._size = size
        self._items: dict[bytes, ClientIdentity] = {}

    def get(self, der: bytes) -> ClientIdentity:
        identity = self._items.get(der)
        if identity is None:
            identity = identity_from_der(der)
            if len(self._items) >= self._size:
                del self._items[next(iter(self._items))]
            self._items[der] = identity
        return identity
