"""One canonicaliser for email addresses (docs/guarantees.md §3.5).

`parse_email()` turns the path of a MAIL/RCPT command (or a CLI argument) into an
`EmailAddress` whose `address` is the exact string given to the upstream, or into an
`AddressProblem` carrying the SMTP reply. The string checked for opt-out is derived from
`address` and nothing else, so what is checked is what is sent.

Policy (README "How addresses are keyed"):
- The domain is case-insensitive: lower-cased, IDNs converted to their A-label.
- The local part is sent as given (RFC 5321 §2.4: case-sensitive on the wire) but keyed
  case-insensitively (Unicode NFC, then casefold): over-suppression is the safe failure.
- Subaddresses: an opt-out of ``bob@x`` also covers ``bob+anything@x``; the reverse does not hold.
- Compatibility forms: a local part is also looked up in its NFKC form (full-width
  U+FF42 U+FF4F U+FF42 is ``bob``), so a sender cannot reach an opted-out mailbox by
  spelling it in characters a receiving system may fold. Lookups are wider than writes:
  over-suppression is the safe failure. Confusables across scripts (Cyrillic U+0430 for
  Latin ``a``) are different mailboxes that no receiving system folds together: checked
  and sent as given.
- Refused: control characters (553 5.1.3), non-ASCII without SMTPUTF8 (553 5.6.7), quoted
  local parts, source routes, address literals, ``%``/``!`` routing hacks, display names,
  lists and comments (553 5.1.3) — each of those is a way to check one address and send another.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import idna

MAX_LOCAL_OCTETS = 64  # RFC 5321 §4.5.3.1.1
MAX_DOMAIN_OCTETS = 255  # RFC 5321 §4.5.3.1.2
MAX_PATH_OCTETS = 254  # RFC 5321 §4.5.3.1.3 (256 including the angle brackets)

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# RFC 5322 atext without "%" and "!" (historic source-routing hacks that relays interpret).
_ATEXT_ASCII = r"A-Za-z0-9#$&'*+/=?^_`{|}~\-"
_DOT_ATOM_ASCII = re.compile(rf"[{_ATEXT_ASCII}]+(?:\.[{_ATEXT_ASCII}]+)*")
_DOT_ATOM_UTF8 = re.compile(
    rf"[{_ATEXT_ASCII}\u0080-\U0010ffff]+(?:\.[{_ATEXT_ASCII}\u0080-\U0010ffff]+)*"
)
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


@dataclass(frozen=True, slots=True, kw_only=True)
class EmailAddress:
    address: str  # canonical addr-spec, sent upstream byte-for-byte
    key_form: str  # what the pseudonym is computed from
    base_key_form: str | None  # key form without a +subaddress, when there is one
    utf8: bool  # needs SMTPUTF8 upstream
    # NFKC forms of the two above when they differ (lookups only; see the module docstring)
    compat_key_forms: tuple[str, ...] = ()

    def key_forms(self) -> tuple[str, ...]:
        """Every form an opt-out of this recipient may be stored under; `key_form` first."""
        forms: tuple[str, ...] = (self.key_form,)
        if self.base_key_form is not None:
            forms += (self.base_key_form,)
        return forms + tuple(f for f in self.compat_key_forms if f not in forms)


@dataclass(frozen=True, slots=True, kw_only=True)
class AddressProblem:
    reply: str  # full SMTP reply line, never echoing the address


BAD_SYNTAX = AddressProblem(reply="553 5.1.3 Bad destination mailbox address syntax")
CONTROL_CHARS = AddressProblem(reply="553 5.1.3 Control characters are not allowed in addresses")
NEEDS_SMTPUTF8 = AddressProblem(reply="553 5.6.7 Non-ASCII address requires the SMTPUTF8 parameter")
TOO_LONG = AddressProblem(reply="553 5.1.3 Address too long")
ROUTING = AddressProblem(
    reply="553 5.1.3 Source routes, quoted local parts and % or ! routing are not accepted"
)


def _key_local(local: str) -> str:
    return unicodedata.normalize("NFC", local).casefold()


def _compat_local(local: str) -> str:
    """NFKC case fold (Unicode's NFKC_Casefold, approximated): full-width, ligature and
    other compatibility spellings of one local part give one string."""
    folded = unicodedata.normalize("NFKC", local).casefold()
    return unicodedata.normalize("NFKC", folded)


def _with_base(local: str, domain: str) -> tuple[str, ...]:
    """`local@domain`, then the form without a +subaddress when there is one."""
    base_local, plus, _tag = local.partition("+")
    full = f"{local}@{domain}"
    return (full, f"{base_local}@{domain}") if plus and base_local else (full,)


def domain_a_label(domain: str) -> str | None:
    """Lower-case A-label form of `domain`, or None when it is not a valid host name.

    IDNA 2008 (RFC 5891) with UTS #46 mapping, non-transitional: ``faß.de`` is
    ``xn--fa-hia.de``, a different registrable domain from ``fass.de`` (Python's own
    ``"idna"`` codec is IDNA 2003 and would map it there). An ASCII domain holding
    ``xn--`` labels is checked as IDNA 2008 too, so every spelling of one domain has one
    key and a label no registry could issue is refused.
    """
    if not domain.isascii() or "xn--" in domain.lower():
        try:
            domain = idna.encode(domain, uts46=True, transitional=False).decode("ascii")
        except (idna.IDNAError, UnicodeError, ValueError):
            return None
    domain = domain.lower()
    if len(domain) > MAX_DOMAIN_OCTETS or domain.endswith("."):
        return None
    labels = domain.split(".")
    if not all(_LABEL.fullmatch(label) for label in labels):
        return None
    return domain


def parse_email(path: str, *, smtputf8: bool) -> EmailAddress | AddressProblem:
    """Validate a bare addr-spec (the inside of ``<...>``) and derive its canonical form."""
    if _CONTROL.search(path):
        return CONTROL_CHARS
    if not path.isascii() and not smtputf8:
        return NEEDS_SMTPUTF8
    if path.startswith("@") or path.startswith('"') or "%" in path or "!" in path:
        return ROUTING
    local, at, domain = path.rpartition("@")
    if not at or not local or not domain:
        return BAD_SYNTAX
    atom = _DOT_ATOM_UTF8 if smtputf8 else _DOT_ATOM_ASCII
    if not atom.fullmatch(local) or domain.startswith("["):
        return BAD_SYNTAX
    local = unicodedata.normalize("NFC", local)
    canon_domain = domain_a_label(domain)
    if canon_domain is None:
        return BAD_SYNTAX
    if len(local.encode()) > MAX_LOCAL_OCTETS:
        return TOO_LONG
    address = f"{local}@{canon_domain}"
    if len(address.encode()) > MAX_PATH_OCTETS:
        return TOO_LONG
    forms = _with_base(_key_local(local), canon_domain)
    compat = _with_base(_compat_local(local), canon_domain)
    return EmailAddress(
        address=address,
        key_form=forms[0],
        base_key_form=forms[1] if len(forms) > 1 else None,
        utf8=not address.isascii(),
        compat_key_forms=tuple(f for f in compat if f not in forms),
    )


def split_path(arg: str) -> tuple[str, str] | None:
    """Split an SMTP ``<path> [params]`` argument. None when it is not exactly one path.

    Anything with a second ``<`` or ``>`` inside the path (display names, lists such as
    ``Bob <b@y>, evil@z``) is refused here rather than guessed at.
    """
    arg = arg.strip()
    if arg.startswith("<"):
        end = arg.find(">")
        if end < 0:
            return None
        path, rest = arg[1:end], arg[end + 1 :]
        if "<" in path or (rest and not rest.startswith(" ")):
            return None
        return path, rest.strip()
    path, _, rest = arg.partition(" ")
    if any(c in path or c in rest for c in "<>,"):
        return None
    return path, rest.strip()


# A header From holding exactly one mailbox (RFC 5322 §3.4), in the plain forms applications
# write: ``addr-spec`` or ``[display-name] <addr-spec>``, the display name made of atoms,
# dots, encoded words, quoted strings and simple comments. Groups, lists, routes, trailing
# comments and anything else are not read at all (None): a form that one parser reads as
# one mailbox and another as a different one is how a From check is bypassed
# (CVE-2023-27043 in Python's own `email.utils.getaddresses`).
_QUOTED = r'"(?:[^"\\]|\\.)*"'
_COMMENT = r"\((?:[^()\\]|\\.)*\)"
_PHRASE_CHAR = r'[^"<>@,;:\\()\[\]]'
_BARE = r'[^\s"<>(),;:\\\[\]]+'
_HEADER_FROM = re.compile(
    rf"(?:{_QUOTED}|{_COMMENT}|{_PHRASE_CHAR})*<(?P<angle>[^<>]*)>|(?P<bare>{_BARE})"
)
# Controls but tab (folding white space unfolds to it), and U+FFFD (bytes that were not UTF-8)
_HEADER_FORBIDDEN = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\ufffd]")


def header_from_domain(values: Sequence[str]) -> str | None:
    """The A-label domain of a message's header From, or None.

    `values` are the unfolded bodies of every From field. None unless there is exactly one
    field holding exactly one mailbox whose address `parse_email` accepts (so no quoted
    local part, route or ``%`` hack, and a valid IDNA 2008 domain). One reading for the
    From binding and for choosing the DKIM key, so what is checked is what is signed.
    """
    if len(values) != 1:
        return None
    value = values[0].strip()
    if _HEADER_FORBIDDEN.search(value):
        return None
    match = _HEADER_FROM.fullmatch(value)
    if match is None:
        return None
    addr = match.group("angle") if match.group("bare") is None else match.group("bare")
    parsed = parse_email(addr.strip(), smtputf8=True)
    if isinstance(parsed, AddressProblem):
        return None
    return parsed.address.rpartition("@")[2]


@dataclass(frozen=True, slots=True, kw_only=True)
class PhoneNumber:
    e164: str  # sent to the provider and keyed, byte-for-byte the same string

    @property
    def key_form(self) -> str:
        return self.e164


MAX_PHONE_CHARS = 64  # longest sane written form ("tel:+1 (202) 555-0173 ext. 12345" and spacing)
# C0/C1 controls and the Unicode line/paragraph separators: never part of a number, and the
# characters header and log injection use. Zero-width and format characters are left to
# `phonenumbers`, which drops them.
_PHONE_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_E164 = re.compile(r"\+[1-9][0-9]{1,14}")  # ITU-T E.164: at most 15 digits


def parse_phone(text: str, *, region: str) -> PhoneNumber | None:
    """E.164 via `phonenumbers` (never a hand-written digit regex: look-alikes get past one).

    Every spelling of one number gives one string: "+1 555 010 0000", "15550100000",
    "(555) 010-0000" (with region "US"), full-width and Arabic-Indic digits, "tel:" URIs.
    An extension is dropped (a text cannot reach one), so it never splits the key. Refused:
    control characters, numbers that are only locally dialable or of impossible length
    (`is_possible_number` with reason IS_POSSIBLE, not IS_POSSIBLE_LOCAL_ONLY), and a
    number without "+" when no default region is configured (ambiguous).
    """
    import phonenumbers  # local: keeps the SMTP path from importing its metadata

    if not text or _PHONE_FORBIDDEN.search(text) or len(text) > MAX_PHONE_CHARS:
        return None
    try:
        number = phonenumbers.parse(text, region or None)
    except phonenumbers.NumberParseException:
        return None
    reason = phonenumbers.is_possible_number_with_reason(number)
    if reason != phonenumbers.ValidationResult.IS_POSSIBLE:
        return None
    number.extension = None
    e164 = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    return PhoneNumber(e164=e164) if _E164.fullmatch(e164) else None
