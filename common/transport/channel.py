"""What both ends of a gRPC channel share: message size limits and mutual-TLS material."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sottovoce.common.errors import ConfigError
from sottovoce.common.protocol.limits import MAX_MESSAGE_BYTES

CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
)


@dataclass(frozen=True)
class TlsConfig:
    """Mutual TLS material: this end's certificate and key, and the CA that signs the peers.

    The coordinator requires a client certificate and takes the holder's identity from its
    common name; a holder checks the coordinator's certificate against ``ca_path``.
    ``server_name`` (client side only) overrides the name the coordinator's certificate is
    checked against, for addresses such as ``127.0.0.1`` that are not in the certificate.
    """

    cert_path: Path
    key_path: Path
    ca_path: Path
    server_name: str | None = None

    def read(self) -> tuple[bytes, bytes, bytes]:
        """(certificate chain, private key, CA certificates) as PEM bytes."""
        return _read_pem(self.cert_path), _read_pem(self.key_path), _read_pem(self.ca_path)


def _read_pem(path: Path) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read TLS file: {exc.strerror}") from exc
    if b"-----BEGIN " not in data:
        raise ConfigError(f"{path}: not a PEM file")
    return data
