"""Sender grants: which categories and which From domains a sender may use
(docs/guarantees.md §3.3, §3.4).

A category chosen by the message (a header, the native SMS API's field) is sender-controlled
input: without grants any sender could pick a category that needs no lookup and reach an
opted-out recipient. So a sender without a `categories` list may use every category with
`opt_out = true`, and a category with `opt_out = false` (it bypasses opt-outs) only when its
grant names it. One rule for every channel.

The header From is sender-controlled too, and the gateway DKIM-signs what it forwards: a
sender with `from_domains` may only use a From mailbox in exactly those domains (a
subdomain must be listed itself), so one application cannot send, signed, as another.
"""

from __future__ import annotations

from gateway.core.rules import Category

RULE = "sender.categories"  # the audit entry's `rule` for a refusal
REASON = "category-not-permitted"
FROM_RULE = "sender.from_domains"  # the audit entry's `rule` for a From domain refusal
FROM_REASON = "from-domain-not-permitted"


def permitted(grants: tuple[str, ...] | None, category: Category) -> bool:
    """Whether a sender whose grant list is `grants` (None: the default) may use `category`."""
    if grants is None:
        return category.opt_out
    return category.name in grants


def from_permitted(from_domains: tuple[str, ...], domain: str | None) -> bool:
    """Whether a sender bound to `from_domains` (A-labels; () = any) may send as `domain`.

    `domain` is the A-label of the message's one From mailbox, None when the header From
    is not exactly one plain mailbox: a bound sender is then refused (it could show one
    domain to a reader and another to a filter). Exact match only: ``a.example`` does not
    cover ``mail.a.example``, whose DKIM and DMARC results a receiver keeps apart.
    """
    if not from_domains:
        return True
    return domain is not None and domain in from_domains
