"""Demo certificates: a demo CA, a server certificate, participant client certificates, a CRL,
and a set of deliberately bad client certificates that the gateway must refuse.

Everything is EC P-256 (fast to generate and to verify) and written as PEM. `write_demo_certs`
is idempotent: it reuses a directory whose certificates and CRL are all still usable, and
otherwise regenerates the whole set, so the CA always matches what it signed.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_SUBJECT = "CN=AUP Gateway Demo CA,O=AUP Demo Market,C=US"
CLIENT_NAMES = ("jdoex1234", "asmithx5678", "bleex4242", "monitorx0001")
BAD_KINDS = ("expired", "notyet", "otherca", "selfsigned", "revoked", "serveronly")
# Bad certificates carry a real user's name: a DN alone must never let anyone in.
BAD_CN = "jdoex1234"

_CA_DAYS = 3650
_LEAF_DAYS = 365
_CRL_DAYS = 30
_SKEW = dt.timedelta(hours=1)  # backdate notBefore so a peer with a slow clock accepts it
_MARGIN = dt.timedelta(days=1)  # reuse only what stays usable for at least this long

Pair = tuple[Path, Path]


@dataclass(frozen=True)
class DemoCerts:
    ca: Path
    ca_key: Path
    server: Path
    server_key: Path
    crl: Path
    clients: dict[str, Pair]  # name -> (cert, key); each also has a <name>-bundle.pem
    bad: dict[str, Pair]  # kind -> (cert, key)


def bundle_path(cert: Path) -> Path:
    """The cert+key file next to a client or bad certificate (for curl --cert and ab -E)."""
    return cert.with_name(cert.name.removesuffix(".pem") + "-bundle.pem")


def participant_subject(cn: str) -> x509.Name:
    """C, O, OU, CN in ASN.1 order, so that rfc4514_string() reads CN=...,OU=people,O=CAISO,C=US."""
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "CAISO"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "people"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def demo_paths(out: Path) -> DemoCerts:
    """Where write_demo_certs puts each file under `out` (nothing is read or written)."""
    return DemoCerts(
        ca=out / "ca.pem",
        ca_key=out / "ca-key.pem",
        server=out / "server.pem",
        server_key=out / "server-key.pem",
        crl=out / "crl.pem",
        clients={
            n: (out / "clients" / f"{n}.pem", out / "clients" / f"{n}-key.pem")
            for n in CLIENT_NAMES
        },
        bad={k: (out / "bad" / f"{k}.pem", out / "bad" / f"{k}-key.pem") for k in BAD_KINDS},
    )


def write_demo_certs(out: Path, now: dt.datetime | None = None) -> DemoCerts:
    """Create (or reuse) the demo CA, server, client and bad certificates and the CRL in `out`."""
    now = now or dt.datetime.now(dt.UTC)
    paths = demo_paths(Path(out))
    if not _still_usable(paths, now):
        _generate(paths, now)
    return paths


def _all_files(p: DemoCerts) -> list[Path]:
    files = [p.ca, p.ca_key, p.server, p.server_key, p.crl]
    for cert, key in [*p.clients.values(), *p.bad.values()]:
        files += [cert, key, bundle_path(cert)]
    return files


def _still_usable(p: DemoCerts, now: dt.datetime) -> bool:
    if not all(f.is_file() for f in _all_files(p)):
        return False
    try:
        soon = now + _MARGIN
        for path in [p.ca, p.server, *(cert for cert, _ in p.clients.values())]:
            cert = x509.load_pem_x509_certificate(path.read_bytes())
            if not cert.not_valid_before_utc <= now or not soon <= cert.not_valid_after_utc:
                return False
        notyet = x509.load_pem_x509_certificate(p.bad["notyet"][0].read_bytes())
        crl = x509.load_pem_x509_crl(p.crl.read_bytes())
        return (
            notyet.not_valid_before_utc > soon
            and crl.next_update_utc is not None
            and crl.next_update_utc > soon
        )
    except (OSError, ValueError):
        return False


def _generate(p: DemoCerts, now: dt.datetime) -> None:
    ca_key = _new_key()
    ca = _ca_cert(x509.Name.from_rfc4514_string(CA_SUBJECT), ca_key, now)
    _write_pair(p.ca, p.ca_key, ca, ca_key, bundle=False)

    server_key = _new_key()
    server_name = x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "AUP Demo Market"),
            x509.NameAttribute(NameOID.COMMON_NAME, "localhost"),
        ]
    )
    san = x509.SubjectAlternativeName(
        [
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1")),
        ]
    )
    server = _leaf(
        server_name,
        server_key.public_key(),
        ca,
        ca_key,
        now,
        [ExtendedKeyUsageOID.SERVER_AUTH],
        san=san,
    )
    _write_pair(p.server, p.server_key, server, server_key, bundle=False)

    for name, (cert_path, key_path) in p.clients.items():
        key = _new_key()
        cert = _leaf(
            participant_subject(name),
            key.public_key(),
            ca,
            ca_key,
            now,
            [ExtendedKeyUsageOID.CLIENT_AUTH],
        )
        _write_pair(cert_path, key_path, cert, key)

    revoked_serial = _write_bad(p, ca, ca_key, now)
    _write(p.crl, _crl(ca, ca_key, [revoked_serial], now).public_bytes(serialization.Encoding.PEM))


def _write_bad(
    p: DemoCerts, ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, now: dt.datetime
) -> int:
    """Write the bad certificates; returns the serial number that the CRL must revoke."""
    subject = participant_subject(BAD_CN)
    client = [ExtendedKeyUsageOID.CLIENT_AUTH]
    day = dt.timedelta(days=1)
    other_key = _new_key()
    other_ca = _ca_cert(
        x509.Name.from_rfc4514_string("CN=Untrusted Other CA,O=Elsewhere,C=US"), other_key, now
    )
    keys = {kind: _new_key() for kind in BAD_KINDS}
    certs = {
        "expired": _leaf(
            subject,
            keys["expired"].public_key(),
            ca,
            ca_key,
            now,
            client,
            not_before=now - 30 * day,
            not_after=now - day,
        ),
        "notyet": _leaf(
            subject,
            keys["notyet"].public_key(),
            ca,
            ca_key,
            now,
            client,
            not_before=now + _LEAF_DAYS * day,
            not_after=now + 2 * _LEAF_DAYS * day,
        ),
        "otherca": _leaf(subject, keys["otherca"].public_key(), other_ca, other_key, now, client),
        "selfsigned": _leaf(
            subject, keys["selfsigned"].public_key(), None, keys["selfsigned"], now, client
        ),
        "revoked": _leaf(subject, keys["revoked"].public_key(), ca, ca_key, now, client),
        "serveronly": _leaf(
            subject,
            keys["serveronly"].public_key(),
            ca,
            ca_key,
            now,
            [ExtendedKeyUsageOID.SERVER_AUTH],
        ),
    }
    for kind, (cert_path, key_path) in p.bad.items():
        _write_pair(cert_path, key_path, certs[kind], keys[kind])
    return certs["revoked"].serial_number


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _ca_cert(
    name: x509.Name, key: ec.EllipticCurvePrivateKey, now: dt.datetime
) -> x509.Certificate:
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _SKEW)
        .not_valid_after(now + dt.timedelta(days=_CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )


def _leaf(
    subject: x509.Name,
    public: ec.EllipticCurvePublicKey,
    issuer: x509.Certificate | None,
    signer: ec.EllipticCurvePrivateKey,
    now: dt.datetime,
    usages: Sequence[x509.ObjectIdentifier],
    *,
    san: x509.SubjectAlternativeName | None = None,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> x509.Certificate:
    """An end-entity certificate signed by `issuer`, or self-signed when issuer is None."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject if issuer is None else issuer.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - _SKEW)
        .not_valid_after(not_after or now + dt.timedelta(days=_LEAF_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(), critical=True)
        .add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
    )
    if issuer is not None:
        builder = builder.add_extension(_authority_key_id(issuer), critical=False)
    if san is not None:
        builder = builder.add_extension(san, critical=False)
    return builder.sign(signer, hashes.SHA256())


def _crl(
    ca: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    serials: Sequence[int],
    now: dt.datetime,
) -> x509.CertificateRevocationList:
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.subject)
        .last_update(now - _SKEW)
        .next_update(now + dt.timedelta(days=_CRL_DAYS))
        .add_extension(x509.CRLNumber(1), critical=False)
        .add_extension(_authority_key_id(ca), critical=False)
    )
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(now - _SKEW)
            .add_extension(x509.CRLReason(x509.ReasonFlags.key_compromise), critical=False)
            .build()
        )
    return builder.sign(ca_key, hashes.SHA256())


def _key_usage(cert_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _authority_key_id(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _write_pair(
    cert_path: Path,
    key_path: Path,
    cert: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    bundle: bool = True,
) -> None:
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write(cert_path, cert_pem)
    _write(key_path, key_pem, secret=True)
    if bundle:
        _write(bundle_path(cert_path), cert_pem + key_pem, secret=True)


def _write(path: Path, data: bytes, secret: bool = False) -> None:
    """Write via a temporary file and rename, so a reloading server never reads half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if secret else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o600 if secret else 0o644)  # os.open's mode is masked by the umask
    os.replace(tmp, path)
