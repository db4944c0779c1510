"""Reading certificate and key files (each problem named with its file) and comparing
public keys: shared by the TLS contexts (`gateway.tls`) and the development CA
(`gateway.devcerts`)."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes


def read_pem(path: Path, what: str, problems: list[str]) -> bytes | None:
    """The bytes of `path`, or None with the problem (naming `what` and the file) added."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        problems.append(f"{what} {path} does not exist")
    except IsADirectoryError:
        problems.append(f"{what} {path} is a folder, not a file")
    except OSError as exc:
        problems.append(f"{what} {path} cannot be read ({exc.strerror})")
    return None


def spki(key: PublicKeyTypes) -> bytes:
    """A public key as DER SubjectPublicKeyInfo: two keys match when these are equal."""
    der = serialization.Encoding.DER
    return key.public_bytes(der, serialization.PublicFormat.SubjectPublicKeyInfo)
