"""The HTML of the unsubscribe pages (pure: view values in, bytes out).

Plain language, one task per page, no JavaScript, no external resources (the CSP allows
none). Accessibility (WCAG 2.2 AA): `lang`, a `<main>` landmark and one `<h1>`, every
control labelled, checkboxes grouped in a `<fieldset>` with a `<legend>`, a 3 px focus
outline, text and controls at 7:1 contrast or more, and nothing that blocks zooming. The
pages name categories only: never an address or anything else about the recipient.
Every value placed in the HTML passes through `html.escape`.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass

_STYLE = """
:root { color-scheme: light; }
body { margin: 0; background: #ffffff; color: #1b1b1b;
  font: 1.125rem/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
main { max-width: 38rem; margin: 0 auto; padding: 2rem 1.25rem 3rem; }
h1 { font-size: 1.75rem; line-height: 1.25; margin: 0 0 1rem; }
h2 { font-size: 1.25rem; margin: 2rem 0 0.5rem; }
p { margin: 0 0 1rem; }
form { margin: 0 0 1.5rem; }
fieldset { border: 1px solid #595959; border-radius: 6px; margin: 0 0 1rem; padding: 0.75rem 1rem; }
legend { font-weight: 600; padding: 0 0.25rem; }
.choice { display: flex; align-items: flex-start; gap: 0.6rem; margin: 0.5rem 0; }
.choice input { width: 1.35rem; height: 1.35rem; margin: 0.15rem 0 0; flex: none; }
.state { color: #3d3d3d; }
button { font: inherit; font-weight: 600; color: #ffffff; background: #0b4f8a;
  border: 2px solid #0b4f8a; border-radius: 6px; padding: 0.6rem 1.2rem; cursor: pointer; }
button:hover { background: #083a66; }
a { color: #0b4f8a; }
:focus-visible { outline: 3px solid #1b1b1b; outline-offset: 3px; }
.notice { border-left: 4px solid #0b4f8a; padding: 0.5rem 0 0.5rem 1rem; }
.error { border-left: 4px solid #9b1c1c; padding: 0.5rem 0 0.5rem 1rem; color: #7a1515; }
"""


@dataclass(frozen=True, slots=True, kw_only=True)
class Choice:
    """One opt-outable category on the page."""

    name: str
    stopped: bool  # the recipient already opted out of it
    consented: bool = False  # an opt-in category the recipient agreed to (docs/consent.md)


def label(name: str) -> str:
    """How a category is named to a person: `appointment-reminder` -> appointment reminder."""
    return name.replace("-", " ")


def _page(title: str, body: str) -> bytes:
    doc = (
        '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n"
        f"<body>\n<main>\n{body}</main>\n</body>\n</html>\n"
    )
    return doc.encode("utf-8")


def _always_sent(names: Sequence[str]) -> str:
    if not names:
        return ""
    kinds = ", ".join(html.escape(label(n)) for n in names)
    return f"<p>Some messages are always sent because you need them: {kinds}.</p>\n"


def preferences(
    *,
    category: str,
    stopped_this: bool,
    all_stopped: bool,
    others: Sequence[Choice],
    always_sent: Sequence[str],
    error: str = "",
    consented_this: bool = False,
) -> bytes:
    """The GET page: one button for this kind of email, checkboxes for the rest and "all".
    Categories the recipient agreed to (consent-required ones) say so: stopping them
    withdraws that agreement."""
    kind = html.escape(label(category))
    parts = ["<h1>Email preferences</h1>\n"]
    if error:
        parts.append(f'<p class="error" role="alert">{html.escape(error)}</p>\n')
    parts.append(f"<p>You got this link in a <strong>{kind}</strong> email from us.</p>\n")
    if all_stopped:
        parts.append('<p class="notice">You are unsubscribed from all emails we can stop.</p>\n')
    elif stopped_this:
        parts.append(f'<p class="notice">You are already unsubscribed from {kind} emails.</p>\n')
    elif consented_this:
        parts.append(
            f"<p>You agreed to get {kind} emails. Unsubscribing withdraws that agreement.</p>\n"
        )
    parts.append(
        '<form method="post">\n<input type="hidden" name="scope" value="this">\n'
        f'<button type="submit">Unsubscribe from {kind} emails</button>\n</form>\n'
        "<h2>Or choose what to stop</h2>\n"
        '<form method="post">\n<fieldset>\n<legend>Stop these emails</legend>\n'
    )
    for choice in others:
        name = html.escape(choice.name)
        done = choice.stopped or all_stopped
        state = ' <span class="state">(already stopped)</span>' if done else ""
        if choice.consented and not done:
            state = ' <span class="state">(you agreed to these; stopping them withdraws it)</span>'

        attrs = " checked disabled" if done else ""
        parts.append(
            f'<div class="choice"><input type="checkbox" id="c-{name}" name="category" '
            f'value="{name}"{attrs}><label for="c-{name}">'
            f"{html.escape(label(choice.name)).capitalize()} emails{state}</label></div>\n"
        )
    all_attrs = " checked disabled" if all_stopped else ""
    parts.append(
        f'<div class="choice"><input type="checkbox" id="c-all" name="all" value="1"{all_attrs}>'
        '<label for="c-all">All emails we can stop</label></div>\n'
        '</fieldset>\n<button type="submit">Stop the emails I chose</button>\n</form>\n'
    )
    parts.append(_always_sent(always_sent))
    return _page("Email preferences", "".join(parts))


def confirmed(*, categories: Sequence[str], all: bool, always_sent: Sequence[str]) -> bytes:
    """After a POST: what is now stopped. It took effect before this page was sent."""
    if all:
        what = "any email we can stop"
    else:
        names = [html.escape(label(c)) for c in categories]
        joined = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
        what = f"{joined} emails"
    body = (
        "<h1>You are unsubscribed</h1>\n"
        f'<p class="notice">You will no longer get {what}. This has already taken effect.</p>\n'
        f"{_always_sent(always_sent)}"
        '<p><a href="">See your email preferences</a></p>\n'
    )
    return _page("You are unsubscribed", body)


INVALID = _page(
    "This link does not work",
    "<h1>This link does not work</h1>\n"
    "<p>This unsubscribe link is not valid. It may be incomplete, or too old.</p>\n"
    "<p>To stop these emails, use the unsubscribe link in a recent email from us, "
    "or contact the sender.</p>\n",
)

UNAVAILABLE = _page(
    "Please try again",
    "<h1>Please try again in a minute</h1>\n"
    "<p>We could not save or show your choice just now. Nothing has changed yet.</p>\n",
)

BAD_REQUEST = _page(
    "Something went wrong",
    "<h1>Something went wrong</h1>\n"
    "<p>We could not understand that request. Nothing has changed. "
    "Open the unsubscribe link again and choose once more.</p>\n",
)
