"""
The interception CA (SPEC §13): its files, and the leaf certificates it signs.

A CA comes from the operator's files (C{[intercept] ca_cert} and C{ca_key}) or is generated once
in the state directory (C{ca.pem} and C{ca-key.pem}; the directory made 0700 when missing, the
key written 0600) and loaded from there on every later start.  Generated CAs are ECDSA P-256,
C{BasicConstraints(ca=True, path_length=0)}, valid for ten years.

Leaf certificates are for one host each (a C{dNSName}, or an C{iPAddress} for an IP literal),
short-lived (L{LEAF_VALIDITY}, well under the 398 days clients accept), for C{serverAuth}, with
their own ECDSA P-256 key.

Nothing here keeps state or uses the reactor: the time is passed in.  Errors are
L{CAFilesError}, whose message names the file and never holds key material.
"""

from __future__ import annotations

import datetime
import fcntl
import hashlib
import ipaddress
import os
from typing import cast

import attrs
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: The generated CA's common name.
CA_NAME = "aoaiproxy interception CA"
#: The file names of a generated CA, in the state directory.
CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca-key.pem"
#: How long a generated CA is valid.
CA_VALIDITY = datetime.timedelta(days=3650)
#: How long a leaf certificate is valid, and how long before its end it is replaced.
LEAF_VALIDITY = datetime.timedelta(days=30)
LEAF_RENEW_BEFORE = datetime.timedelta(days=7)
#: Certificates start this long before they are made (clients whose clock is a little behind).
BACKDATE = datetime.timedelta(days=1)


class CAFilesError(Exception):
    """A CA that cannot be loaded or written.  The message names the file, never key material."""


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _signing_hash(key: CertificateIssuerPrivateKeyTypes) -> hashes.SHA256 | None:
    # Ed25519 and Ed448 sign without a separate hash.
    return None if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey) else hashes.SHA256()


def _pem_key(key: CertificateIssuerPrivateKeyTypes) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@attrs.frozen
class Leaf:
    """A host's certificate and key, and when the certificate ends."""

    host: str
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def not_after(self) -> datetime.datetime:
        return self.cert.not_valid_after_utc

    def due(self, now: datetime.datetime) -> bool:
        """Whether it should be replaced at C{now} (less than L{LEAF_RENEW_BEFORE} left)."""
        return self.not_after - now < LEAF_RENEW_BEFORE


@attrs.frozen
class Authority:
    """
    A CA certificate and its key, and the files they were read from (the paths, and a digest
    of their contents, to tell whether they changed).
    """

    cert: x509.Certificate
    key: CertificateIssuerPrivateKeyTypes = attrs.field(repr=False)
    cert_path: str
    key_path: str
    digest: bytes = attrs.field(repr=False)

    @property
    def pem(self) -> bytes:
        """The CA certificate, PEM (public: what clients trust)."""
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, host: str, now: datetime.datetime) -> Leaf:
        """A new leaf certificate for C{host} (a name, or an IP address), valid from C{now}."""
        key = ec.generate_private_key(ec.SECP256R1())
        try:
            name: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            name = x509.DNSName(host)
        # The SAN is what clients check.  A common name is at most 64 characters: a longer
        # name gets an empty subject, and then the SAN must be critical (RFC 5280 4.2.1.6).
        short = len(host) <= 64
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)] if short else [])
        try:
            ca_key_id = self.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            authority_key_id = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_key_id)
        except x509.ExtensionNotFound:
            authority_key_id = x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + LEAF_VALIDITY)
            .add_extension(x509.SubjectAlternativeName([name]), critical=not short)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(cert_sign=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(authority_key_id, critical=False)
            .sign(self.key, _signing_hash(self.key))
        )
        return Leaf(host, cert, key)


def generate(now: datetime.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A new self-signed CA, valid from C{now} for L{CA_VALIDITY}."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "aoaiproxy"),
            x509.NameAttribute(NameOID.COMMON_NAME, CA_NAME),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise CAFilesError(f"cannot read the interception CA's {what} {path}: {e.strerror or e}") from None


def load(cert_path: str, key_path: str) -> Authority:
    """
    Read a CA from PEM files: the certificate must be a CA's (C{BasicConstraints ca=True}) and
    the key (unencrypted) must be its key.  Raises L{CAFilesError}.
    """
    cert_pem = _read(cert_path, "certificate")
    key_pem = _read(key_path, "key")
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise CAFilesError(
            f"the interception CA's certificate {cert_path} is not a PEM certificate"
        ) from None
    try:
        loaded = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise CAFilesError(
            f"the interception CA's key {key_path} is encrypted; give it unencrypted"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise CAFilesError(f"the interception CA's key {key_path} is not a PEM private key") from None
    if not isinstance(
        loaded,
        ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey,
    ):
        raise CAFilesError(f"the interception CA's key {key_path} is of a kind that cannot sign certificates")
    key = cast(CertificateIssuerPrivateKeyTypes, loaded)
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise CAFilesError(f"the interception CA's certificate {cert_path} is not a CA certificate")
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.DER, public) != cert.public_key().public_bytes(
        serialization.Encoding.DER, public
    ):
        raise CAFilesError(
            f"the interception CA's key {key_path} is not the key of its certificate {cert_path}"
        )
    return Authority(cert, key, cert_path, key_path, digest(cert_pem, key_pem))


def digest(cert_pem: bytes, key_pem: bytes) -> bytes:
    """A digest of a CA's two files, to tell whether they changed."""
    return hashlib.sha256(hashlib.sha256(cert_pem).digest() + hashlib.sha256(key_pem).digest()).digest()


def files_digest(cert_path: str, key_path: str) -> bytes | None:
    """L{digest} of the files as they are now, or None when one cannot be read."""
    try:
        return digest(_read(cert_path, "certificate"), _read(key_path, "key"))
    except CAFilesError:
        return None


def in_state_dir(state_dir: str, now: datetime.datetime) -> tuple[Authority, bool]:
    """
    The CA kept in C{state_dir}: loaded when its two files are there; generated and written
    when neither is (the directory made 0700 if missing, the key 0600, each file written under
    a temporary name and then renamed, under a lock, so that no half-written CA is ever loaded
    and two processes starting at once make one CA).  Returns the CA and whether it was
    generated now.  Raises L{CAFilesError}, also when only one of the two files is there.
    """
    cert_path = os.path.join(state_dir, CA_CERT_FILE)
    key_path = os.path.join(state_dir, CA_KEY_FILE)
    try:
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        lock = os.open(os.path.join(state_dir, ".ca.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise _unwritable(state_dir, e) from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        present = [os.path.lexists(p) for p in (cert_path, key_path)]
        if all(present):
            return load(cert_path, key_path), False
        if any(present):
            there, missing = (cert_path, key_path) if present[0] else (key_path, cert_path)
            raise CAFilesError(
                f"the interception CA in {state_dir} is incomplete: {there} is there but not {missing} "
                "(remove it to have a new CA generated)"
            )
        cert, key = generate(now)
        cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        key_pem = _pem_key(key)
        try:
            _write_new(key_path, key_pem, 0o600)
            _write_new(cert_path, cert_pem, 0o644)
        except OSError as e:
            raise _unwritable(state_dir, e) from None
        return Authority(cert, key, cert_path, key_path, digest(cert_pem, key_pem)), True
    finally:
        os.close(lock)  # and with it the lock


def _unwritable(state_dir: str, e: OSError) -> CAFilesError:
    where = f" ({e.filename})" if e.filename else ""
    return CAFilesError(f"cannot write the interception CA in {state_dir}: {e.strerror or e}{where}")


def _write_new(path: str, data: bytes, mode: int) -> None:
    """Write C{path} with C{mode} (never wider, whatever the umask) through a temporary file."""
    temporary = f"{path}.{os.getpid()}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
