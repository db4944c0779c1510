"""Reading and writing the key file (JSON, mode 0600, replaced atomically)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import orjson

from gateway.core import keys
from gateway.errors import ConfigError, KeyringError


def load(path: Path) -> keys.Keyring:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise KeyringError(f"key file {path} does not exist (run `optgate keys init`)") from None
    except OSError as exc:
        raise KeyringError(f"key file {path}: {exc.strerror}") from exc
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise KeyringError(f"key file {path}: not JSON ({exc})") from exc
    try:
        return keys.from_document(doc)
    except ConfigError as exc:
        raise KeyringError(f"key file {path}: {exc}") from exc


def save(path: Path, ring: keys.Keyring, *, exclusive: bool = False) -> None:
    """Write the key file with mode 0600. With `exclusive`, fail if it already exists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = orjson.dumps(keys.to_document(ring), option=orjson.OPT_INDENT_2)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if exclusive:
            # link() fails if the target exists: two processes racing to create keys
            # cannot both win and leave different keys behind.
            os.link(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_or_create(path: Path) -> tuple[keys.Keyring, bool]:
    """Load the key file, creating it first when it does not exist. Returns (ring, created)."""
    if not path.exists():
        try:
            save(path, keys.generate(), exclusive=True)
        except FileExistsError:
            pass
        else:
            return load(path), True
    return load(path), False
