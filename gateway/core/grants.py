"""Category grants: which categories a sender may use (SPEC §3 "Category grants").

A category chosen by the message (a header, the native SMS API's field) is sender-controlled
input: without grants any sender could pick a category that needs no lookup and reach an
opted-out recipient. So a sender without a `categories` list may use every category with
`opt_out = true`, and a category with `opt_out = false` (it bypasses opt-outs) only when its
grant names it. One rule for every channel.
"""

from __future__ import annotations

from gateway.core.rules import Category

RULE = "sender.categories"  # the audit entry's `rule` for a refusal
REASON = "category-not-permitted"


def permitted(grants: tuple[str, ...] | None, category: Category) -> bool:
    """Whether a sender whose grant list is `grants` (None: the default) may use `category`."""
    if grants is None:
        return category.opt_out
    return category.name in grants
