"""Renders docs/configuration.md from the section dataclasses (every key, type, default,
meaning). `python -m gateway.config.reference` prints it; a test checks the file is current.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gateway.config.load import ARRAYS, SECTIONS
from gateway.config.schema import Listen, specs

_KIND = {
    "str": "string",
    "int": "integer",
    "float": "number",
    "bool": "boolean",
    "path": "path",
    "listen": "HOST:PORT",
    "strings": "list of strings",
}
HEADER = """# Configuration reference

Generated from `gateway/config/sections.py` by `python -m gateway.config.reference`; CI
checks that this file is current. `optgate serve` with no file runs on these defaults.
Relative paths are relative to the config file's folder (the working directory when there
is no file). Secrets come from environment variables or files, never from the command line.
The `[sync]` table is described in the README's "Downstream sync" section.
"""


def _default(value: Any, doc: str) -> str:
    if doc:
        return doc
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, Listen):
        return f'`"{value}"`'
    if isinstance(value, Path):
        return f'`"{value}"`'
    if isinstance(value, tuple):
        return "`[" + ", ".join(f'"{v}"' for v in value) + "]`"
    if isinstance(value, int) and value >= 10_000:
        return f"`{value}`"
    return f"`{value}`"


def _table(title: str, cls: type) -> list[str]:
    lines = [f"## `{title}`", "", "| key | type | default | meaning |", "|---|---|---|---|"]
    for key, spec, default in specs(cls):
        meaning = spec.doc
        if spec.choices:
            meaning += " One of: " + ", ".join(f"`{c}`" for c in spec.choices) + "."
        if spec.minimum is not None:
            meaning += f" At least {spec.minimum:g}."
        if spec.maximum is not None:
            meaning += f" At most {spec.maximum:g}."
        row = f"| `{key}` | {_KIND[spec.kind]} | {_default(default, spec.default_doc)} |"
        lines.append(f"{row} {meaning} |")
    return [*lines, ""]


def render() -> str:
    out = [HEADER]
    for name, cls in SECTIONS.items():
        out.extend(_table(f"[{name}]", cls))
    for name, cls in ARRAYS.items():
        out.extend(_table(f"[[{name}]]", cls))
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    print(render(), end="")
