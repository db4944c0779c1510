"""What an inbound text is, and the TwiML reply to one: `classify` reads a reply as the
rules' keyword or revocation (also in the looser forms a person means as a stop), and
`twiml_message` writes exactly one reply message. Pure: no IO."""

from __future__ import annotations

import re
from xml.sax.saxutils import escape

from gateway.core.rules import KeywordMatch, Rules, normalise_reply

XML_DECL = '<?xml version="1.0" encoding="UTF-8"?>'
EMPTY_TWIML = f"{XML_DECL}<Response/>"
# Courtesy words around a revocation ("please stop texting me", "STOP, thanks"). They are
# only ever stripped to find a *stop*: "yes please" must not opt anyone back in.
_POLITE = r"(?:please|pls|plz|kindly|thanks|thank you|thx|por favor|gracias)"
_POLITE_HEAD = re.compile(rf"^(?:{_POLITE}[\s,]+)+")
_POLITE_TAIL = re.compile(rf"(?:[\s,]+{_POLITE})+$")
_BREAKS = re.compile(r"[\s._-]+")  # spaces, dots, hyphens, underscores inside a reply


def classify(rules: Rules, text: str) -> KeywordMatch | None:
    """The rules' keyword or revocation that `text` is, as a whole, or None.

    Beyond `Rules.keyword`, a reply is also read as a stop when it is one once courtesy
    words around it are removed, its hyphens read as spaces ("opt-out") or its word breaks
    taken out ("stop all", "s.t.o.p"): FCC 24-24
    counts what a reasonable person would understand as a revocation. Those readings
    never produce a start or help match, and words inside a longer message never count
    ("stop by the front desk" is not a revocation).
    """
    match = rules.keyword(text)
    if match is not None:
        return match
    reply = normalise_reply(text)
    bare = [_POLITE_TAIL.sub("", _POLITE_HEAD.sub("", f)) for f in (reply, reply.replace("-", " "))]
    # Last, with the word breaks taken out: "stop all" is STOPALL, "s.t.o.p" is STOP.
    for candidate in (*bare, _BREAKS.sub("", bare[0])):
        if candidate and candidate != text:
            found = rules.keyword(candidate)
            if found is not None and found.kind == "stop":
                return found
    return None


def twiml_message(text: str) -> str:
    """Exactly one reply message."""
    return f"{XML_DECL}<Response><Message>{escape(text)}</Message></Response>"
