"""Certificates for mutual TLS between a coordinator and its data holders (`cryptography`).

One small private CA per federation: ``sottovoce certs init`` makes it, ``sottovoce certs
issue`` signs a coordinator certificate (with the host names holders dial) or a holder
certificate (whose common name *is* the holder's identity: the coordinator takes it from
the certificate, never from a message). Keys are P-256, written 0600; certificates are
PEM. Layout of a certificate folder::

    ca.pem  ca.key          the federation's CA (keep ca.key offline once issuing is done)
    NAME.pem  NAME.key      one per coordinator or holder

A real deployment may use any CA instead: the transport only needs PEM files.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sottovoce.common.errors import ConfigError
from sottovoce.common.transport.channel import TlsConfig

CA_NAME = "ca"
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
DEFAULT_DAYS = 365


@dataclass(frozen=True)
class Issued:
    """Paths of a written certificate and key."""

    cert_path: Path
    key_path: Path


def init_ca(
    folder: Path, *, common_name: str = "sottovoce federation CA", days: int = 3650
) -> Issued:
    """Create the federation's CA in ``folder``; refuses to overwrite an existing one."""
    folder = Path(folder)
    if (folder / f"{CA_NAME}.pem").exists() or (folder / f"{CA_NAME}.key").exists():
        raise ConfigError(f"{folder}: already holds a CA (ca.pem / ca.key); not overwriting it")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return _write(folder, CA_NAME, key, cert)


def issue(
    folder: Path,
    name: str,
    *,
    server_hosts: tuple[str, ...] = (),
    days: int = DEFAULT_DAYS,
) -> Issued:
    """Sign a certificate for ``name`` with the CA in ``folder``.

    With ``server_hosts`` it is a coordinator certificate valid for those DNS names / IP
    addresses; without, a holder (client) certificate whose common name is ``name``.
    """
    folder = Path(folder)
    if not NAME_PATTERN.fullmatch(name) or name == CA_NAME:
        raise ConfigError(
            f"certificate name {name!r}: use 1-64 letters, digits, '.', '_' or '-' (not 'ca')"
        )
    if (folder / f"{name}.pem").exists():
        raise ConfigError(f"{folder / name}.pem exists; not overwriting a certificate")
    ca_key, ca_cert = _load_ca(folder)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server_hosts else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if server_hosts:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_general_name(host) for host in server_hosts]),
            critical=False,
        )
    return _write(folder, name, key, builder.sign(ca_key, hashes.SHA256()))


def tls_config(folder: Path, name: str, *, server_name: str | None = None) -> TlsConfig:
    """The transport's TLS material for ``name`` from a certificate folder (checked now)."""
    folder = Path(folder)
    config = TlsConfig(
        cert_path=folder / f"{name}.pem",
        key_path=folder / f"{name}.key",
        ca_path=folder / f"{CA_NAME}.pem",
        server_name=server_name,
    )
    config.read()  # one clear line now, not a handshake failure later
    return config


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _load_ca(folder: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    try:
        cert = x509.load_pem_x509_certificate((folder / f"{CA_NAME}.pem").read_bytes())
        key = serialization.load_pem_private_key((folder / f"{CA_NAME}.key").read_bytes(), None)
    except FileNotFoundError:
        raise ConfigError(f"{folder}: no CA here (run `sottovoce certs init` first)") from None
    except ValueError as exc:
        raise ConfigError(f"{folder}: the CA files are not valid PEM: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{folder / CA_NAME}.key: expected an EC private key")
    return key, cert


def _write(
    folder: Path, name: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate
) -> Issued:
    folder.mkdir(parents=True, exist_ok=True)
    key_path, cert_path = folder / f"{name}.key", folder / f"{name}.pem"
    pem_key = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    descriptor = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(pem_key)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Issued(cert_path=cert_path, key_path=key_path)
