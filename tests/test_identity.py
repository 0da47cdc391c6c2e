"""gateway.edge.identity on the demo certificates: what the limiter keys on and upstreams see."""

from __future__ import annotations

import datetime as dt
import hashlib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.demo.certs import DemoCerts, participant_subject
from gateway.edge.identity import IdentityCache, identity_from_der, normalise_dn


def der(certs: DemoCerts, name: str) -> bytes:
    cert, _ = certs.clients[name] if name in certs.clients else certs.bad[name]
    loaded = x509.load_pem_x509_certificate(cert.read_bytes())
    return loaded.public_bytes(serialization.Encoding.DER)


def test_identity_of_a_participant_certificate(certs: DemoCerts) -> None:
    data = der(certs, "jdoex1234")
    identity = identity_from_der(data)
    assert identity.subject == "CN=jdoex1234,OU=people,O=CAISO,C=US"
    assert identity.cn == "jdoex1234"
    assert identity.organisation == "CAISO"
    assert identity.fingerprint == hashlib.sha256(data).hexdigest()
    assert len(identity.fingerprint) == 64
    assert identity.xfcc == (
        f'Hash={identity.fingerprint};Subject="CN=jdoex1234,OU=people,O=CAISO,C=US"'
    )


def test_identity_key_modes(certs: DemoCerts) -> None:
    identity = identity_from_der(der(certs, "asmithx5678"))
    assert identity.key("subject") == "CN=asmithx5678,OU=people,O=CAISO,C=US"
    assert identity.key("cn") == "asmithx5678"
    assert identity.key("fingerprint") == identity.fingerprint


def test_renewed_certificate_keeps_the_subject_not_the_fingerprint(certs: DemoCerts) -> None:
    """The revoked demo certificate carries jdoex1234's DN: a stand-in for a renewal."""
    current = identity_from_der(der(certs, "jdoex1234"))
    renewed = identity_from_der(der(certs, "revoked"))
    assert renewed.subject == current.subject
    assert renewed.fingerprint != current.fingerprint


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("CN=jdoex1234,OU=people,O=CAISO,C=US", "CN=jdoex1234,OU=people,O=CAISO,C=US"),
        ("cn = jdoex1234, ou=people,O=CAISO , C=US", "CN=jdoex1234,OU=people,O=CAISO,C=US"),
        ("  CN=JDoeX1234,O=CAISO  ", "CN=JDoeX1234,O=CAISO"),  # values keep their case
        ("CN=Doe\\, John,O=ACME", "CN=Doe\\, John,O=ACME"),  # an escaped comma is not a split
        ("C=US,O=CAISO,OU=people,CN=jdoex1234", "C=US,O=CAISO,OU=people,CN=jdoex1234"),
    ],
)
def test_normalise_dn(text: str, expected: str) -> None:
    assert normalise_dn(text) == expected


@pytest.mark.parametrize("text", ["jdoex1234", "CN=jdoex1234,people", ""])
def test_normalise_dn_refuses_what_is_not_a_dn(text: str) -> None:
    with pytest.raises(ValueError, match="not a distinguished name"):
        normalise_dn(text)


def test_quote_in_a_subject_survives_the_xfcc_header(certs: DemoCerts) -> None:
    """XFCC quotes the Subject and escapes its double quotes; unescaping gives the subject back."""
    issuer = x509.load_pem_x509_certificate(certs.ca.read_bytes())
    ca_key = serialization.load_pem_private_key(certs.ca_key.read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(participant_subject('o"brien'))
        .issuer_name(issuer.subject)
        .public_key(ca_key.public_key())  # any key will do: only the subject matters here
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(ca_key, hashes.SHA256())
    )
    identity = identity_from_der(cert.public_bytes(serialization.Encoding.DER))
    assert identity.subject == 'CN=o\\"brien,OU=people,O=CAISO,C=US'  # RFC 4514 escaping
    quoted = identity.xfcc.split(";Subject=", 1)[1]
    assert quoted.startswith('"') and quoted.endswith('"')
    assert quoted[1:-1].replace('\\"', '"') == identity.subject


def test_identity_cache_is_bounded_and_reuses(certs: DemoCerts) -> None:
    cache = IdentityCache(size=2)
    a, b, c = (der(certs, n) for n in ("jdoex1234", "asmithx5678", "bleex4242"))
    first = cache.get(a)
    assert cache.get(a) is first  # parsed once
    cache.get(b)
    cache.get(c)  # the oldest (a) is dropped to stay within size
    assert len(cache._items) == 2
    assert a not in cache._items
    assert cache.get(a) == first and cache.get(a) is not first
