"""A node's TLS identity (crowdd.trust.identity): created once, reloaded as is, never silently replaced."""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import ssl
import stat
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from crowdd.errors import CrowddError, InputError
from crowdd.trust.identity import Identity, IdentityError, check_certificate, fingerprint_of

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="POSIX file modes")
NOW = datetime.datetime.now(datetime.timezone.utc)


def make_cert(
    key: object = None,
    *,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
    issuer_key: object = None,
) -> bytes:
    """A PEM certificate for ``key`` (default: a new P-256 key), self-signed unless ``issuer_key``."""
    key = key if key is not None else ec.generate_private_key(ec.SECP256R1())
    signer = issuer_key if issuer_key is not None else key
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "peer")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())  # type: ignore[attr-defined]
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or NOW - datetime.timedelta(days=1))
        .not_valid_after(not_after or NOW + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
    )
    algorithm = None if isinstance(signer, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(signer, algorithm).public_bytes(serialization.Encoding.PEM)  # type: ignore[arg-type]


# --- creation and reload ---------------------------------------------------------------------


def test_created_once_then_reloaded_identically(tmp_path: Path) -> None:
    first = Identity.load_or_create(tmp_path / "id", "node-1")
    key_bytes = first.key_path.read_bytes()
    cert_bytes = first.cert_path.read_bytes()
    again = Identity.load_or_create(tmp_path / "id", "node-1")
    assert again == first
    assert first.key_path.read_bytes() == key_bytes and first.cert_path.read_bytes() == cert_bytes
    assert first.fingerprint == fingerprint_of(first.cert_pem)
    assert first.key_path.name == "node-1.key" and first.cert_path.name == "node-1.crt"


def test_the_certificate_is_a_pinnable_p256_self_signed_leaf(tmp_path: Path) -> None:
    ident = Identity.load_or_create(tmp_path, "node-1")
    cert = x509.load_pem_x509_certificate(ident.cert_pem)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "node-1"
    assert cert.issuer == cert.subject
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign  # it can sign handshakes, not certificates
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert datetime.timedelta(days=3640) < lifetime < datetime.timedelta(days=3660)
    assert cert.not_valid_before_utc <= NOW
    cert.verify_directly_issued_by(cert)
    assert check_certificate(ident.cert_pem) == ident.fingerprint
    other = Identity.load_or_create(tmp_path, "node-2")
    assert x509.load_pem_x509_certificate(other.cert_pem).serial_number != cert.serial_number
    assert other.fingerprint != ident.fingerprint


@posix_only
def test_key_is_0600_and_new_directory_0700(tmp_path: Path) -> None:
    ident = Identity.load_or_create(tmp_path / "a" / "b", "n")
    assert stat.S_IMODE(ident.key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "a" / "b").stat().st_mode) == 0o700
    assert not [p for p in (tmp_path / "a" / "b").iterdir() if p.name.startswith(".")]  # no temp files left


@posix_only
def test_readable_key_gets_its_mode_fixed_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ident = Identity.load_or_create(tmp_path, "n")
    before = ident.key_path.read_bytes()
    os.chmod(ident.key_path, 0o644)
    with caplog.at_level(logging.WARNING, logger="crowdd.trust.identity"):
        again = Identity.load_or_create(tmp_path, "n")
    assert again == ident
    assert stat.S_IMODE(ident.key_path.stat().st_mode) == 0o600
    assert ident.key_path.read_bytes() == before
    assert "0600" in caplog.text and str(ident.key_path) in caplog.text


def test_missing_certificate_is_reissued_from_the_same_key(tmp_path: Path) -> None:
    ident = Identity.load_or_create(tmp_path, "n")
    key_bytes = ident.key_path.read_bytes()
    ident.cert_path.unlink()
    again = Identity.load_or_create(tmp_path, "n")
    assert ident.key_path.read_bytes() == key_bytes
    old = x509.load_pem_x509_certificate(ident.cert_pem).public_key()
    new = x509.load_pem_x509_certificate(again.cert_pem).public_key()
    assert old == new


# --- never silently replaced ----------------------------------------------------------------


@pytest.mark.parametrize(
    "garbage",
    [b"", b"not a key", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"],
)
def test_corrupt_key_raises_and_is_left_unchanged(tmp_path: Path, garbage: bytes) -> None:
    ident = Identity.load_or_create(tmp_path, "n")
    ident.key_path.write_bytes(garbage)
    cert_before = ident.cert_path.read_bytes()
    with pytest.raises(IdentityError, match=str(ident.key_path)) as info:
        Identity.load_or_create(tmp_path, "n")
    assert isinstance(info.value, CrowddError)
    assert ident.key_path.read_bytes() == garbage
    assert ident.cert_path.read_bytes() == cert_before


def test_unsupported_key_type_raises_and_is_left_unchanged(tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path = tmp_path / "n.key"
    path.write_bytes(pem)
    with pytest.raises(IdentityError, match="P-256"):
        Identity.load_or_create(tmp_path, "n")
    assert path.read_bytes() == pem and not (tmp_path / "n.crt").exists()


def test_corrupt_certificate_raises_and_is_left_unchanged(tmp_path: Path) -> None:
    ident = Identity.load_or_create(tmp_path, "n")
    key_before = ident.key_path.read_bytes()
    ident.cert_path.write_bytes(b"-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n")
    with pytest.raises(IdentityError, match=str(ident.cert_path)):
        Identity.load_or_create(tmp_path, "n")
    assert ident.cert_path.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----\nbroken")
    assert ident.key_path.read_bytes() == key_before


def test_certificate_of_another_key_raises(tmp_path: Path) -> None:
    ident = Identity.load_or_create(tmp_path, "n")
    foreign = make_cert()
    ident.cert_path.write_bytes(foreign)
    with pytest.raises(IdentityError, match="does not match"):
        Identity.load_or_create(tmp_path, "n")
    assert ident.cert_path.read_bytes() == foreign


def test_lost_key_is_not_replaced(tmp_path: Path) -> None:
    ident = Identity.load_or_create(tmp_path, "n")
    ident.key_path.unlink()
    with pytest.raises(IdentityError, match=str(ident.key_path)):
        Identity.load_or_create(tmp_path, "n")
    assert not ident.key_path.exists()
    assert ident.cert_path.read_bytes() == ident.cert_pem


def test_unreadable_key_raises(tmp_path: Path) -> None:
    (tmp_path / "n.key").mkdir()  # unreadable as a file, whatever our privileges
    with pytest.raises(IdentityError, match="n.key"):
        Identity.load_or_create(tmp_path, "n")
    assert (tmp_path / "n.key").is_dir()


@pytest.mark.parametrize("name", ["", "../x", "a/b", ".hidden", "x" * 65])
def test_bad_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(IdentityError):
        Identity.load_or_create(tmp_path, name)
    assert list(tmp_path.iterdir()) == []


# --- fingerprints and peer certificates -----------------------------------------------------


def test_fingerprint_of_pem_and_der_agree(tmp_path: Path) -> None:
    ident = Identity.load_or_create(tmp_path, "n")
    der = ssl.PEM_cert_to_DER_cert(ident.cert_pem.decode())
    expected = "sha256:" + hashlib.sha256(der).hexdigest()
    assert fingerprint_of(ident.cert_pem) == fingerprint_of(der) == expected == ident.fingerprint
    with pytest.raises(InputError) as info:
        fingerprint_of(b"garbage")
    assert info.value.field == "cert"


def test_check_certificate_accepts_p256_and_ed25519() -> None:
    for key in (ec.generate_private_key(ec.SECP256R1()), ed25519.Ed25519PrivateKey.generate()):
        pem = make_cert(key)
        assert check_certificate(pem) == fingerprint_of(pem)


def _refused(pem: bytes) -> str:
    with pytest.raises(InputError) as info:
        check_certificate(pem)
    assert info.value.field == "cert"
    return info.value.message


def test_check_certificate_refuses_bad_certificates() -> None:
    good = make_cert()
    assert "larger" in _refused(good + b"\n" * 4096)
    assert _refused(b"garbage")
    assert _refused(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    assert _refused(good + make_cert())  # two certificates
    key_pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    assert _refused(key_pem)  # a private key is not a certificate (and must not be echoed back)
    assert "expired" in _refused(
        make_cert(not_before=NOW - datetime.timedelta(days=9), not_after=NOW - datetime.timedelta(days=1))
    )
    assert "not valid before" in _refused(make_cert(not_before=NOW + datetime.timedelta(days=1)))
    assert "P-256" in _refused(make_cert(ec.generate_private_key(ec.SECP384R1())))
    assert "P-256" in _refused(make_cert(rsa.generate_private_key(public_exponent=65537, key_size=2048)))
    assert "self-signed" in _refused(make_cert(issuer_key=ec.generate_private_key(ec.SECP256R1())))
