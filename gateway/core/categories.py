"""Which category a message is sent in: one rule for every channel.

The message may name a category (an email header, the native SMS API's field); else the
sender's default applies, else the rules' default. The category must exist, be sent on the
message's channel, and be within the sender's grants (`gateway.core.grants`): a category
the message names is sender-controlled input, and one with ``opt_out = false`` skips the
lookup. What is refused is a value (`Unchosen`); each channel words its own reply.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from enum import StrEnum

from gateway.core import grants
from gateway.core.rules import Category, Rules


class Why(StrEnum):
    TWICE = "more-than-one"  # the message named two different categories
    UNKNOWN = "unknown"
    NOT_FOR_CHANNEL = "not-for-channel"
    NOT_PERMITTED = "not-permitted"  # not within the sender's grants


@dataclass(frozen=True, slots=True, kw_only=True)
class Unchosen:
    why: Why
    category: Category | None = None  # the category found, for the last two


def choose(
    rules: Rules,
    *,
    asked: Collection[str],
    default: str,
    granted: tuple[str, ...] | None,
    channel: str,
    ascii_only: bool = False,
) -> Category | Unchosen:
    """The category for a message that named `asked` (none, one, or several distinct
    names), from a sender whose default is `default` ("" for none) and whose grant list is
    `granted` (None: every opt-outable category).

    `ascii_only`: match names on ASCII only. Email headers do, since Unicode case mapping
    folds characters such as the Kelvin sign into ASCII letters and a name is never meant
    to be spelt that way; the SMS API's field is looked up as given.
    """
    if len(asked) > 1:
        return Unchosen(why=Why.TWICE)
    name = next(iter(asked)) if asked else (default or rules.default_category)
    category = rules.category(name) if name.isascii() or not ascii_only else None
    if category is None:
        return Unchosen(why=Why.UNKNOWN)
    if not category.allows(channel):
        return Unchosen(why=Why.NOT_FOR_CHANNEL, category=category)
    if not grants.permitted(granted, category):
        return Unchosen(why=Why.NOT_PERMITTED, category=category)
    return category
