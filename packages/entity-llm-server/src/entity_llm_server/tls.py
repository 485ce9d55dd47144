"""TLS and mutual TLS server credentials from PEM files."""

from __future__ import annotations

from pathlib import Path

import grpc


class TlsConfigError(ValueError):
    """The TLS files are missing, unreadable, or do not go together."""


def _read(path: str | Path, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise TlsConfigError(f"cannot read {what} {str(path)!r}: {exc}") from exc
    if b"-----BEGIN" not in data:
        raise TlsConfigError(f"{what} {str(path)!r} is not a PEM file")
    return data


def server_credentials(
    cert: str | Path | None, key: str | Path | None, client_ca: str | Path | None = None
) -> grpc.ServerCredentials | None:
    """Credentials for a TLS port, or None for plaintext (no certificate given).

    Args:
        cert: the server's PEM certificate chain.
        key: its PEM private key.
        client_ca: PEM CA certificates; given, every client must present a
            certificate signed by one of them (mutual TLS).
    """
    if cert is None and key is None:
        if client_ca is not None:
            raise TlsConfigError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if cert is None or key is None:
        raise TlsConfigError("--tls-cert and --tls-key go together")
    pair = (_read(key, "TLS key"), _read(cert, "TLS certificate"))
    ca = _read(client_ca, "TLS client CA") if client_ca is not None else None
    return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)
