"""Finding and reading a rules folder, and checking the senders' categories against it; the
policy itself is parsed by `gateway.core.rules`.

The folder is `[rules] dir` when configured, else `./rules` when present, else the copy
shipped inside the package (`gateway/default_rules`, the same files as the repository's
`rules/`). Every `*.toml` in it is read, in name order, and merged; names starting with
a dot (editor lock and swap files) are skipped.
"""

from __future__ import annotations

import tomllib
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from gateway.config import Sender
from gateway.core import grants
from gateway.core.rules import Rules
from gateway.core.rules_parse import parse, version_of
from gateway.errors import ConfigError

PACKAGE_RULES = "default_rules"


def load_dir(path: Path) -> Rules:
    """Read and validate every `*.toml` in `path`.

    Raises one `ConfigError` naming every problem: unreadable files and TOML syntax
    errors (with file and line) first; only a folder that decodes is checked further,
    so a syntax error does not also show up as a missing category.
    """
    if not path.is_dir():
        what = "is not a folder" if path.exists() else "does not exist"
        raise ConfigError(f"rules folder {path} {what}")
    files = sorted(p for p in path.glob("*.toml") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise ConfigError(f"rules folder {path} holds no .toml files")
    problems: list[str] = []
    raw: list[tuple[str, bytes]] = []
    docs: list[tuple[str, dict[str, Any]]] = []
    for file in files:
        try:
            data = file.read_bytes()
        except OSError as exc:
            problems.append(f"{file}: cannot read ({exc.strerror})")
            continue
        raw.append((file.name, data))
        try:
            docs.append((str(file), tomllib.loads(data.decode("utf-8"))))
        except UnicodeDecodeError as exc:
            problems.append(f"{file}: not UTF-8 (byte {exc.start})")
        except tomllib.TOMLDecodeError as exc:
            # The message ends "(at line L, column C)".
            problems.append(f"{file}: invalid TOML: {exc}")
    if problems:
        raise ConfigError(problems)
    # The version hashes names, not paths, so the same policy has the same version
    # wherever it is installed (rules/ and the packaged copy agree).
    return parse(docs, version=version_of(raw))


def packaged_dir() -> Path:
    """The rules shipped inside the package, as a real folder."""
    folder = resources.files("gateway").joinpath(PACKAGE_RULES)
    if not isinstance(folder, Path):
        # A zipped install has no folder to read; say how to proceed instead of guessing.
        raise ConfigError(
            "the packaged default rules are not on the filesystem (zipped install?):"
            " set [rules] dir to a rules folder"
        )
    return folder


def choose_dir(configured: Path | None, cwd: Path) -> Path:
    """`configured` if given, else `cwd/rules` when it is a folder, else the packaged rules."""
    if configured is not None:
        return configured
    local = cwd / "rules"
    if local.is_dir():
        return local
    return packaged_dir()


def check_senders(rules: Rules, senders: Sequence[Sender]) -> None:
    """Where config and rules meet: every sender's `default_category`.

    Raises one `ConfigError` naming every sender whose `default_category` is not a category
    of the rules or is outside its own grant: every message that names no category would be
    refused, and a default that bypassed opt-outs without a grant would be a hidden one. A
    sender without `default_category` falls back to the rules' default (always opt-outable);
    when its grant leaves that out, a message naming no category is refused at send time
    (`sender.categories`), as any ungranted category is. A grant may name a category the
    rules do not have (yet): grants only ever narrow what a sender may use.
    """
    problems: list[str] = []
    for s in senders:
        if not s.default_category:
            continue
        where = f"[[senders]] {s.name}: default_category {s.default_category!r}"
        category = rules.category(s.default_category)
        if category is None:
            problems.append(f"{where} is not a category in the rules")
        elif not grants.permitted(s.categories, category):
            why = "" if category.opt_out else " (an opt_out = false category needs it by name)"
            problems.append(
                f"{where} is not in its categories{why}: grant it in categories or choose"
                " another default"
            )
    if problems:
        raise ConfigError(problems)
