"""
The interception CA (aoaiproxy.forward.ca) and the leaf cache (aoaiproxy.forward.intercept):
generated once in the state directory and reused (key 0600), or loaded from the operator's
files; leaves valid for their host as a client checks them (chain, SAN, EKU, dates), cached
per host and renewed before they end (a fake clock); bad files refused with one clear line;
SIGHUP's reload swaps a changed CA and keeps the old one when the new files are bad.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from aoaiproxy.config import RESTART_ONLY, Config, ConfigError, LiveConfig, load_config
from aoaiproxy.forward.ca import (
    CA_NAME,
    LEAF_RENEW_BEFORE,
    LEAF_VALIDITY,
    Authority,
    CAFilesError,
    generate,
    in_state_dir,
    load,
)
from aoaiproxy.forward.intercept import Interceptor, ca_paths, intercepted

from .certs import CA, make_ca
from .test_service import UNITS, unit_settings

NOW = datetime.datetime(2026, 6, 1, 12, 0, tzinfo=datetime.timezone.utc)
DAY = datetime.timedelta(days=1)


def verify(authority: Authority | CA, leaf: x509.Certificate, host: str, at: datetime.datetime) -> None:
    """Check C{leaf} for C{host} as a TLS client does (chain to the CA, SAN, EKU, dates)."""
    subject: x509.verification.Subject
    try:
        subject = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        subject = x509.DNSName(host)
    verifier = PolicyBuilder().store(Store([authority.cert])).time(at).build_server_verifier(subject)
    verifier.verify(leaf, [])


def config_for(state_dir: Path, intercept: str = "") -> Config:
    """Interception on, state in C{state_dir}, and C{intercept}: TOML lines of its table."""
    path = state_dir.parent / f"{state_dir.name}.toml"
    path.write_text(f"[intercept]\nenabled = true\n{intercept}")
    return load_config(
        {"endpoint": "https://r.openai.azure.com", "state_dir": str(state_dir), "config": str(path)}, {}
    )


def ca_files(cert: str, key: str) -> str:
    return f"ca_cert = {cert!r}\nca_key = {key!r}\n"


@attrs.define
class Clock:
    now: datetime.datetime = NOW

    def __call__(self) -> float:
        return self.now.timestamp()


@pytest.fixture
def errors() -> Iterator[list[str]]:
    """The text of every error logged meanwhile."""
    seen: list[str] = []

    def observe(event: dict[str, object]) -> None:
        if event.get("log_level") == LogLevel.error:
            seen.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield seen
    globalLogPublisher.removeObserver(observe)


def write_ca(ca: CA, directory: Path, name: str = "ca") -> tuple[str, str]:
    cert = directory / f"{name}.pem"
    key = directory / f"{name}-key.pem"
    cert.write_bytes(ca.pem)
    key.write_bytes(
        ca.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return str(cert), str(key)


# -- the generated CA ---------------------------------------------------------------------------


def test_generated_once_in_the_state_dir_then_reused(tmp_path: Path) -> None:
    state = tmp_path / "missing" / "state"
    old_umask = os.umask(0)  # the modes must not depend on the umask
    try:
        first, generated = in_state_dir(str(state), NOW)
    finally:
        os.umask(old_umask)
    assert generated
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE((state / "ca-key.pem").stat().st_mode) == 0o600
    assert (state / "ca.pem").read_bytes() == first.pem
    assert first.cert_path == str(state / "ca.pem") and first.key_path == str(state / "ca-key.pem")
    again, generated_again = in_state_dir(str(state), NOW + DAY)
    assert not generated_again
    assert again.cert == first.cert and again.digest == first.digest
    # What the directory holds: the CA's two files (and the lock that serialised their making).
    assert {p.name for p in state.iterdir()} <= {"ca.pem", "ca-key.pem", ".ca.lock"}


def test_generated_ca_is_a_ca_for_ten_years() -> None:
    cert, key = generate(NOW)
    assert cert.subject.rfc4514_string() == f"CN={CA_NAME},O=aoaiproxy"
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign
    assert cert.not_valid_before_utc <= NOW
    assert cert.not_valid_after_utc - NOW == datetime.timedelta(days=3650)
    assert key.curve.name == "secp256r1"


def test_only_one_file_in_the_state_dir_is_refused(tmp_path: Path) -> None:
    authority, _ = in_state_dir(str(tmp_path), NOW)
    os.unlink(authority.key_path)
    with pytest.raises(CAFilesError, match=r"incomplete: .*ca\.pem is there but not .*ca-key\.pem") as e:
        in_state_dir(str(tmp_path), NOW)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "ca-key.pem").exists()  # nothing was made up in its place


def test_unwritable_state_dir_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(CAFilesError, match="cannot write the interception CA in") as e:
        in_state_dir(str(blocker / "state"), NOW)
    assert "\n" not in str(e.value)


# -- leaves -------------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["api.openai.com", "127.0.0.1", "::1", "a" * 63 + ".example"])
def test_leaf_is_valid_for_its_host_only(tmp_path: Path, host: str) -> None:
    authority, _ = in_state_dir(str(tmp_path), NOW)
    leaf = authority.issue(host, NOW).cert
    verify(authority, leaf, host, NOW)
    with pytest.raises(VerificationError):
        verify(authority, leaf, "other.example", NOW)
    [name] = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert str(name.value) == (str(ipaddress.ip_address(host)) if ":" in host or host[0].isdigit() else host)
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = authority.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    leaf.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    # Short-lived: far below the 398 days clients accept, and valid a little before now.
    assert leaf.not_valid_after_utc == NOW + LEAF_VALIDITY
    assert leaf.not_valid_before_utc < NOW
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc < datetime.timedelta(days=398)
    with pytest.raises(VerificationError):
        verify(authority, leaf, host, NOW + LEAF_VALIDITY + DAY)


def test_leaf_for_a_long_name_has_a_critical_san_and_no_common_name(tmp_path: Path) -> None:
    authority, _ = in_state_dir(str(tmp_path), NOW)
    host = "b" * 60 + ".example.com"
    leaf = authority.issue(host, NOW).cert
    assert len(leaf.subject) == 0
    assert leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).critical
    verify(authority, leaf, host, NOW)


def test_leaves_are_cached_per_host_and_renewed_before_they_end(tmp_path: Path) -> None:
    clock = Clock()
    live = LiveConfig(config_for(tmp_path))
    interceptor = Interceptor.start(live, clock)
    first = interceptor.leaf("api.openai.com")
    assert interceptor.creator("api.openai.com") is interceptor.creator("api.openai.com")
    assert interceptor.leaf("api.openai.com") is first
    other = interceptor.leaf("example.com")
    assert other.cert.serial_number != first.cert.serial_number
    # Up to LEAF_RENEW_BEFORE before its end, the same leaf.
    clock.now = NOW + LEAF_VALIDITY - LEAF_RENEW_BEFORE - datetime.timedelta(minutes=1)
    assert interceptor.leaf("api.openai.com") is first
    # Then a new one, valid from now.
    clock.now += datetime.timedelta(minutes=2)
    renewed = interceptor.leaf("api.openai.com")
    assert renewed is not first
    assert renewed.not_after == clock.now + LEAF_VALIDITY
    verify(interceptor.authority, renewed.cert, "api.openai.com", NOW + LEAF_VALIDITY + DAY)


# -- the operator's files ------------------------------------------------------------------------


def test_given_files_are_loaded_and_sign_the_leaves(tmp_path: Path) -> None:
    ca = make_ca("operator CA")
    cert, key = write_ca(ca, tmp_path)
    live = LiveConfig(config_for(tmp_path / "state", ca_files(cert, key)))
    interceptor = Interceptor.start(live, Clock(datetime.datetime.now(datetime.timezone.utc)))
    assert interceptor.authority.cert == ca.cert
    assert not (tmp_path / "state").exists()  # nothing generated
    verify(
        ca,
        interceptor.leaf("api.openai.com").cert,
        "api.openai.com",
        datetime.datetime.now(datetime.timezone.utc),
    )


def _bad_files(tmp_path: Path) -> dict[str, tuple[str, str, str, str]]:
    good_cert, good_key = write_ca(make_ca(), tmp_path, "good")
    _, other_key = write_ca(make_ca("another"), tmp_path, "other")
    server_key, server_cert = make_ca().issue(tmp_path, "server", serial=5)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    encrypted = tmp_path / "encrypted.pem"
    encrypted.write_bytes(
        serialization.load_pem_private_key(Path(good_key).read_bytes(), None).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    missing = str(tmp_path / "missing.pem")
    # (certificate, key, the message, the file it names)
    return {
        "missing certificate": (missing, good_key, "cannot read the interception CA's certificate", missing),
        "missing key": (good_cert, missing, "cannot read the interception CA's key", missing),
        "not a certificate": (str(garbage), good_key, "is not a PEM certificate", str(garbage)),
        "not a key": (good_cert, good_cert, "is not a PEM private key", good_cert),
        "encrypted key": (good_cert, str(encrypted), "is encrypted", str(encrypted)),
        "key of another": (good_cert, other_key, "is not the key of its certificate", other_key),
        "not a CA": (str(server_cert), str(server_key), "is not a CA certificate", str(server_cert)),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing certificate",
        "missing key",
        "not a certificate",
        "not a key",
        "encrypted key",
        "key of another",
        "not a CA",
    ],
)
def test_bad_files_are_one_clear_line(tmp_path: Path, case: str) -> None:
    cert, key, message, named = _bad_files(tmp_path)[case]
    with pytest.raises(CAFilesError) as e:
        load(cert, key)
    text = str(e.value)
    assert message in text
    assert "\n" not in text and "PRIVATE KEY" not in text
    assert named in text


# -- reload ---------------------------------------------------------------------------------------


def test_ca_paths_change_on_sighup() -> None:
    assert "intercept_ca_cert" not in RESTART_ONLY and "intercept_ca_key" not in RESTART_ONLY


def test_reload_swaps_a_changed_ca_and_keeps_the_old_one_when_bad(tmp_path: Path, errors: list[str]) -> None:
    now = datetime.datetime.now(datetime.timezone.utc)
    first, second = make_ca("first"), make_ca("second")
    cert, key = write_ca(first, tmp_path)
    live = LiveConfig(config_for(tmp_path / "state", ca_files(cert, key)))
    interceptor = Interceptor.start(live, Clock(now))
    old_leaf = interceptor.leaf("api.openai.com")
    # Unchanged files: nothing happens, the leaf stays.
    assert interceptor.reload()
    assert interceptor.leaf("api.openai.com") is old_leaf
    # Replaced in place, as an operator does: new leaves from the new CA.
    write_ca(second, tmp_path)
    assert interceptor.reload()
    assert interceptor.authority.cert == second.cert
    verify(second, interceptor.leaf("api.openai.com").cert, "api.openai.com", now)
    # A bad file: the CA in force stays, with one line saying why.
    Path(key).write_text("garbage")
    assert not interceptor.reload()
    assert interceptor.authority.cert == second.cert
    [line] = errors
    assert "the old one stays in force" in line and key in line and "garbage" not in line
    # Other files named by a new configuration (a reload swapped it in first).
    third_cert, third_key = write_ca(make_ca("third"), tmp_path, "third")
    live.config = attrs.evolve(live.config, intercept_ca_cert=third_cert, intercept_ca_key=third_key)
    assert interceptor.reload()
    assert interceptor.authority.cert_path == third_cert


def test_reload_of_a_generated_ca(tmp_path: Path) -> None:
    live = LiveConfig(config_for(tmp_path))
    interceptor = Interceptor.start(live, Clock())
    assert ca_paths(live.config) == (interceptor.authority.cert_path, interceptor.authority.key_path)
    first = interceptor.authority
    # Both files removed: a restart would generate a new CA; so does a reload.
    os.unlink(first.cert_path)
    os.unlink(first.key_path)
    assert interceptor.reload()
    assert interceptor.authority.cert != first.cert
    assert Path(first.cert_path).read_bytes() == interceptor.authority.pem


# -- which CONNECTs -------------------------------------------------------------------------------


def test_which_connects_are_intercepted(tmp_path: Path) -> None:
    config = config_for(tmp_path, "hosts = ['b.example:8443', '[0:0::1]']\n")
    assert intercepted(config, "api.openai.com", 443)
    assert not intercepted(config, "api.openai.com", 8443)
    assert intercepted(config, "b.example", 8443)
    assert not intercepted(config, "b.example", 443)
    assert intercepted(config, "::1", 443)
    assert not intercepted(config, "example.com", 443)
    assert not intercepted(attrs.evolve(config, intercept=False), "api.openai.com", 443)


# -- where systemd keeps it -----------------------------------------------------------------------


def test_the_service_unit_keeps_a_private_state_directory() -> None:
    service = unit_settings((UNITS / "aoaiproxy.service").read_text())
    assert service["StateDirectory"] == ["aoaiproxy"]
    assert service["StateDirectoryMode"] == ["0700"]
    # systemd passes it as $STATE_DIRECTORY, the state directory's default.
    env = {"STATE_DIRECTORY": "/var/lib/aoaiproxy"}
    assert load_config({"endpoint": "https://r.openai.azure.com"}, env).state_dir == "/var/lib/aoaiproxy"


@pytest.mark.parametrize("host", ["[1.2.3.4]", "[::1::2]:443"])
def test_bracketed_hosts_must_be_ipv6(tmp_path: Path, host: str) -> None:
    with pytest.raises(ConfigError, match=r"intercept\.hosts: .* is not an IPv6 address in brackets"):
        config_for(tmp_path, f"hosts = [{host!r}]\n")
