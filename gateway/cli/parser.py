"""The argument parser every `optgate` command uses: a usage error names the value that
was wrong and the nearest valid one (`difflib`), and never echoes an address or a phone
number (a recipient's address is personal data, and shells keep history).

``--config`` is accepted before the command and after it (``optgate --config x.toml
serve`` and ``optgate serve --config x.toml``; the one after the command wins), and so is
``--json`` for the commands that print records."""

from __future__ import annotations

import argparse
import re
import sys
from typing import Final, NoReturn

from gateway.optout_fields import looks_personal, nearest

_CHOICE: Final = re.compile(r"invalid choice: '(?P<value>.*?)' \(choose from (?P<choices>.*)\)$")
_UNRECOGNISED: Final = "unrecognized arguments: "


def _reworded(message: str) -> str:
    """argparse's message with the bad value named safely and the nearest choice offered."""
    m = _CHOICE.search(message)
    if m:
        choices = re.findall(r"'([^']*)'", m.group("choices"))
        value, head = m.group("value"), message[: m.start()]
        listed = ", ".join(choices)
        if looks_personal(value):
            return f"{head}invalid choice: the value given (not shown) is not one of {listed}"
        near = nearest(value, choices)
        hint = f"; did you mean {near!r}?" if near else ""
        return f"{head}invalid choice: {value!r} (choose from {listed}){hint}"
    if message.startswith(_UNRECOGNISED):
        words = message[len(_UNRECOGNISED) :].split(" ")
        shown = ["(an address or number)" if looks_personal(w) else w for w in words]
        return _UNRECOGNISED + " ".join(shown)
    return message


class Parser(argparse.ArgumentParser):
    """`argparse.ArgumentParser` whose usage errors suggest and never echo personal data
    (its subcommand parsers are of this class too)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {_reworded(message)}\n")


def with_config(p: argparse.ArgumentParser, *, top: bool = False) -> argparse.ArgumentParser:
    """Give a command ``--config FILE``: a default at the top level only, so an option
    given before the command is not reset by the command's own parser."""
    if "--config" not in p._option_string_actions:
        p.add_argument(
            "--config",
            metavar="FILE",
            default=None if top else argparse.SUPPRESS,
            help="config file (default: $OPTGATE_CONFIG, ./optgate.toml)",
        )
    return p


def with_json(p: argparse.ArgumentParser, *, top: bool = False) -> argparse.ArgumentParser:
    """Give a command that prints records ``--json`` (JSON lines even on a terminal)."""
    p.add_argument(
        "--json",
        action="store_true",
        default=False if top else argparse.SUPPRESS,
        help="JSON lines on stdout even on a terminal (the default when not a terminal)",
    )
    return p


def add_everywhere(p: argparse.ArgumentParser) -> None:
    """Give every command under `p` the top-level ``--config``."""
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                with_config(child)
                add_everywhere(child)
