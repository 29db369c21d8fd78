"""A node's long-lived TLS identity: an ECDSA P-256 key and a self-signed certificate.

Peers pin each other by the certificate itself (as the only trust anchor of a TLS context) or
by its :func:`fingerprint_of`. A new certificate is a self-signed *leaf* (``BasicConstraints
CA=False``, ``digitalSignature`` only, server and client auth): OpenSSL 3 takes it as its own
trust anchor under ``CERT_REQUIRED`` and ``VERIFY_X509_STRICT``, and, unlike a CA, it can issue
nothing: a member cannot mint a certificate that a peer pinning its own would accept (the
handshake refuses the chain: "invalid CA certificate"). Certificates made before this (CA=True,
``keyCertSign``) are still loaded and accepted as they are, never re-issued (their fingerprint is
what peers and volunteers pinned); a minted chain under one still fails the fingerprint check
every connection makes after its handshake.

Files: ``<directory>/<name>.key`` (PKCS#8 PEM, mode 0600, never replaced once written) and
``<directory>/<name>.crt`` (PEM). A corrupt or unreadable file is reported with
:class:`IdentityError` naming it and left as it is: nothing is silently regenerated.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import re
import stat
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from crowdd.errors import CrowddError, InputError

if TYPE_CHECKING:  # cryptography loads when a key or certificate is used (a daemon at rest holds none)
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

logger = logging.getLogger(__name__)

#: How long a new certificate is valid.
VALIDITY = datetime.timedelta(days=3650)
#: A new certificate is valid from this long ago, so peers with a slow clock accept it.
BACKDATE = datetime.timedelta(hours=1)
#: The largest peer certificate :func:`check_certificate` accepts.
MAX_CERT_BYTES = 4096

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class IdentityError(CrowddError):
    """The identity's key or certificate cannot be used; the message names the file."""


@dataclass(frozen=True)
class Identity:
    """A loaded identity: where its files are, its certificate (PEM) and that certificate's fingerprint."""

    key_path: Path
    cert_path: Path
    cert_pem: bytes
    fingerprint: str

    @classmethod
    def load_or_create(cls, directory: Path, name: str) -> Identity:
        """Load ``<name>.key``/``<name>.crt`` from ``directory``, creating them on first start.

        Guarantees: an existing key is never replaced or rewritten (only its mode is tightened to
        0600, with a warning, when group or others may read it); a missing certificate for an
        existing key is re-issued from that key; the returned certificate matches the key.
        Raises :class:`IdentityError` naming the file when a key or certificate is unreadable,
        corrupt, of an unsupported type, or does not match the other, or when only the
        certificate exists (its key is lost: a new identity must be made deliberately).
        """
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        if not _NAME_RE.match(name):
            raise IdentityError(f"identity name {name!r} must be 1-64 letters, digits, '.', '_' or '-'")
        directory = Path(directory)
        key_path = directory / f"{name}.key"
        cert_path = directory / f"{name}.crt"
        if not key_path.exists():
            if cert_path.exists():
                raise IdentityError(
                    f"{key_path}: the key for certificate {cert_path} is missing; "
                    "move the certificate away to create a new identity"
                )
            _ensure_directory(directory)
            new_key = ec.generate_private_key(ec.SECP256R1())
            pem = new_key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            _write_atomic(key_path, pem, 0o600)
            logger.info("created identity key %s", key_path)
        key = _load_key(key_path)
        if not cert_path.exists():
            cert_pem = _self_signed(key, name)
            _write_atomic(cert_path, cert_pem, 0o644)
            logger.info("created identity certificate %s (%s)", cert_path, fingerprint_of(cert_pem))
        cert_pem = _load_cert(cert_path, key)
        return cls(key_path=key_path, cert_path=cert_path, cert_pem=cert_pem, fingerprint=fingerprint_of(cert_pem))


def fingerprint_of(cert: bytes) -> str:
    """``"sha256:" + hex`` of the SHA-256 of the certificate's DER; ``cert`` may be PEM or DER.

    Raises :class:`InputError` (field ``cert``) when ``cert`` is not a certificate.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        if cert.lstrip().startswith(b"-----BEGIN"):
            der = x509.load_pem_x509_certificate(cert).public_bytes(serialization.Encoding.DER)
        else:
            der = x509.load_der_x509_certificate(cert).public_bytes(serialization.Encoding.DER)
    except ValueError as exc:
        raise InputError(f"not a certificate: {exc}", field="cert") from None
    return "sha256:" + hashlib.sha256(der).hexdigest()


def check_certificate(pem: bytes) -> str:
    """Check a peer's certificate before pinning it; return its fingerprint.

    Accepts exactly one PEM certificate of at most :data:`MAX_CERT_BYTES` bytes, valid now,
    with an ECDSA P-256 or Ed25519 key, and self-signed (its signature verifies with its own key),
    so that it works as the sole trust anchor of a pinned TLS context.
    Anything else raises :class:`InputError` with field ``cert``.
    """
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature

    if not isinstance(pem, bytes):
        raise InputError("must be PEM bytes", field="cert")
    if len(pem) > MAX_CERT_BYTES:
        raise InputError(f"larger than {MAX_CERT_BYTES} bytes", field="cert")
    if pem.count(b"-----BEGIN") != 1 or not pem.lstrip().startswith(b"-----BEGIN CERTIFICATE-----"):
        raise InputError("must be exactly one PEM certificate", field="cert")
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise InputError(f"malformed certificate: {exc}", field="cert") from None
    _check_key_type(cert.public_key(), "cert")
    now = datetime.datetime.now(datetime.timezone.utc)
    if now < cert.not_valid_before_utc:
        raise InputError(f"not valid before {cert.not_valid_before_utc.isoformat()}", field="cert")
    if now > cert.not_valid_after_utc:
        raise InputError(f"expired on {cert.not_valid_after_utc.isoformat()}", field="cert")
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        raise InputError("must be self-signed", field="cert") from None
    return fingerprint_of(pem)


def _check_key_type(key: object, where: str) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    if isinstance(key, ed25519.Ed25519PublicKey | ed25519.Ed25519PrivateKey):
        return
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
        return
    raise InputError("key must be ECDSA P-256 or Ed25519", field=where)


def _ensure_directory(directory: Path) -> None:
    if directory.is_dir():
        return
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if sys.platform != "win32":
            os.chmod(directory, 0o700)  # mkdir's mode is masked by the umask
    except OSError as exc:
        raise IdentityError(f"{directory}: cannot create the identity directory: {exc}") from None


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` via a temp file created 0600 in the same directory, then ``os.replace``."""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # created 0600
    except OSError as exc:
        raise IdentityError(f"{path}: cannot write: {exc}") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if mode != 0o600 and sys.platform != "win32":
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise IdentityError(f"{path}: cannot write: {exc}") from None


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise IdentityError(f"{path}: cannot read: {exc}") from None


def _fix_key_mode(path: Path) -> None:
    if sys.platform == "win32":
        return
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            os.chmod(path, 0o600)
            logger.warning("identity key %s was readable by others (mode %o); set it to 0600", path, mode)
    except OSError as exc:
        raise IdentityError(f"{path}: cannot secure the key's mode: {exc}") from None


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    _fix_key_mode(path)
    data = _read(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise IdentityError(f"{path}: not a usable private key ({exc}); the file was left unchanged") from None
    try:
        _check_key_type(key, "key")
    except InputError:
        raise IdentityError(f"{path}: the key must be ECDSA P-256 or Ed25519") from None
    assert isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey)
    return key


def _load_cert(path: Path, key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    data = _read(path)
    try:
        cert = x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise IdentityError(f"{path}: not a usable certificate ({exc}); the file was left unchanged") from None
    if cert.public_key() != key.public_key():
        raise IdentityError(f"{path}: the certificate does not match the key; the file was left unchanged")
    if datetime.datetime.now(datetime.timezone.utc) > cert.not_valid_after_utc:
        logger.warning("identity certificate %s expired on %s: peers will refuse it", path, cert.not_valid_after_utc)
    return cert.public_bytes(serialization.Encoding.PEM)


def _self_signed(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey, name: str) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    public = key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
    )
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    cert = builder.sign(key, algorithm)
    return cert.public_bytes(serialization.Encoding.PEM)
