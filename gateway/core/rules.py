"""The rules: categories, classification, header stripping, SMS texts and keywords.

Pure (docs/guarantees.md §9): this module holds the immutable `Rules` and what they mean;
`gateway.core.rules_parse.parse()` takes the decoded TOML documents of a rules folder, each
with its file name, and returns one `Rules`, or raises one `ConfigError` naming every
problem, each prefixed with the file it is in. Reading the folder is `gateway.rules_files`.

Merging, so a policy can be split over several files: categories and revocations
accumulate (a name or id defined twice is an error), lists (strip globs, keywords) are
united, and a single value (`[defaults] category`, `[sms] footer`, ...) may be set by one
file only.

Floors no file can lower, because they protect recipients:

- `X-Optgate-*` and the category header are always stripped (gateway instructions);
- the keyword lists are a floor (`ALWAYS_STOP`, `ALWAYS_START`, `ALWAYS_HELP`): CTIA's
  universal set, the FCC's per se revocation words (47 CFR 64.1200(a)(10)) and the
  providers' defaults count whatever the files list; files may only add words;
- the default category must be opt-outable, so an unlabelled message can never bypass
  an opt-out.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

import orjson

from gateway.core.channels import CHANNEL_SET

CHANNELS = CHANNEL_SET  # a category's channels are checked by set difference
CONSENT_VALUES = ("required", "none")  # a category's `consent`: opt-in, or (default) opt-out
RESERVED_NAMES = frozenset({"all"})  # "all" means every category in the CLI and unsubscribe form
ALWAYS_STRIP = ("X-Optgate-*",)
# The keyword floor: these always count, whatever the rules files list (files may add words,
# never remove these). Stop: CTIA's universal set (STOP, END, CANCEL, UNSUBSCRIBE, QUIT), the
# FCC's per se revocation words (47 CFR 64.1200(a)(10): also REVOKE, "OPT OUT") and the words
# carriers and providers honour by default (STOPALL, OPTOUT). Start: the CTIA/provider re-opt-in
# words. Help: CTIA's HELP and its usual alias INFO.
ALWAYS_STOP = frozenset(
    {"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "REVOKE", "OPTOUT", "OPT OUT"}
)
ALWAYS_START = frozenset({"START", "UNSTOP", "YES"})
ALWAYS_HELP = frozenset({"HELP", "INFO"})
DEFAULT_CATEGORY_HEADER = "X-Optgate-Category"
DEFAULT_FOOTER = "Reply STOP to opt out."
DEFAULT_HELP = "Reply STOP to opt out, START to opt back in."
DEFAULT_STOP_REPLY = "You are opted out and will get no more texts, except emergency alerts."
DEFAULT_START_REPLY = "You are opted back in. Reply STOP to opt out."
# Headers every forwarded message needs; a strip glob that matches one is a mistake.
PROTECTED_HEADERS = (
    "From", "Sender", "Reply-To", "To", "Cc", "Subject", "Date", "Message-ID",
    "In-Reply-To", "References", "MIME-Version", "Content-Type", "Content-Transfer-Encoding",
)  # fmt: skip

MAX_NAME_CHARS = 64  # category names appear in tokens and form fields; keep them short
MAX_KEYWORD_CHARS = 32  # whole-message keywords; CTIA's longest is a dozen characters
MAX_PHRASE_CHARS = 64  # revocation phrases are short replies, not sentences
MAX_FOOTER_CHARS = 60  # appended to texts that must stay within one 160-character segment
MAX_REPLY_CHARS = 306  # two concatenated GSM-7 segments (153 each)

# The policy digest (`policy_digest`): 16 bytes of sha256, 32 hex characters in every
# decision entry. 128 bits tell apart every policy a deployment will ever run; the full 64
# characters would add a third to a decision entry's size for nothing a reader can use.
POLICY_DIGEST_BYTES = 16
POLICY_DIGEST_FORM = 1  # the canonical form's version: a change of form is a new digest
_SPACE = re.compile(r"\s+")
# Unicode general categories trimmed from both ends of a reply: punctuation, symbols (emoji),
# separators, marks (emoji variation selectors) and other (controls, format characters).
_EDGE_CATEGORIES = frozenset("PSZMC")


@dataclass(frozen=True, slots=True, kw_only=True)
class Category:
    name: str
    opt_out: bool  # False: never suppressed, needs no store lookup
    unsubscribe: bool  # add per-recipient one-click List-Unsubscribe
    channels: tuple[str, ...]
    basis: str = ""
    # consent = "required": sent only to recipients with a valid consent record for it
    # (docs/consent.md); an opt-out still wins, so such a category is always opt-outable.
    consent_required: bool = False

    def allows(self, channel: str) -> bool:
        return channel in self.channels


@dataclass(frozen=True, slots=True, kw_only=True)
class Revocation:
    id: str
    phrase: str  # normalised with `normalise_reply`


@dataclass(frozen=True, slots=True, kw_only=True)
class KeywordMatch:
    kind: Literal["stop", "start", "help"]
    matched: str  # the keyword, or the revocation's id


@dataclass(frozen=True, slots=True, kw_only=True)
class Rules:
    categories: Mapping[str, Category]
    default_category: str
    category_header: str
    strip_headers: tuple[str, ...]  # always includes ALWAYS_STRIP and the category header
    sms_footer: str
    sms_help: str
    sms_stop_reply: str
    sms_start_reply: str
    stop_keywords: frozenset[str]  # upper-case, single spaces
    start_keywords: frozenset[str]
    help_keywords: frozenset[str]
    revocations: tuple[Revocation, ...]
    version: str  # sha256 of the files' names and bytes, for the audit log and metrics
    # The digest of what the rules mean (`policy_digest`), named in every decision entry.
    policy: str = field(init=False, compare=False)
    _strip: re.Pattern[str] = field(init=False, repr=False, compare=False)
    _phrases: Mapping[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "categories", MappingProxyType(dict(self.categories)))
        strip: list[str] = []
        for glob in (*ALWAYS_STRIP, *self.strip_headers, self.category_header):
            # The floor lives here so no way of building Rules can drop it. Skip what an
            # earlier glob already covers.
            if not _covered(glob, strip):
                strip.append(glob)
        object.__setattr__(self, "strip_headers", tuple(strip))
        object.__setattr__(self, "_strip", compile_globs(strip))
        phrases = {r.phrase: r.id for r in self.revocations}
        object.__setattr__(self, "_phrases", MappingProxyType(phrases))
        object.__setattr__(self, "policy", policy_digest(self))

    def category(self, name: str) -> Category | None:
        """The category called `name` (names are lower-case; lookup ignores case)."""
        return self.categories.get(name.strip().lower())

    def strips(self, header_name: str) -> bool:
        """Whether a header of this name is removed before forwarding."""
        return self._strip.fullmatch(header_name) is not None

    def keyword(self, text: str) -> KeywordMatch | None:
        """Classify an inbound SMS: a whole-message keyword or revocation phrase, or None."""
        reply = normalise_reply(text)
        upper = reply.upper()
        if upper in self.stop_keywords:
            return KeywordMatch(kind="stop", matched=upper)
        if reply in self._phrases:
            return KeywordMatch(kind="stop", matched=self._phrases[reply])
        if upper in self.start_keywords:
            return KeywordMatch(kind="start", matched=upper)
        if upper in self.help_keywords:
            return KeywordMatch(kind="help", matched=upper)
        return None


def normalise_reply(text: str) -> str:
    """The form replies and phrases are compared in ("  ¡Stop! " and "*STOP* 🛑" are "stop").

    NFKC (full-width letters read as ASCII ones), format characters (zero-width spaces,
    joiners) removed, case-folded, single spaces, and no punctuation, symbol or emoji at
    either end: a reasonable reader takes "Stop." or "'STOP'" as STOP, and FCC 24-24 asks
    senders to honour what a reasonable person would understand.
    """
    text = unicodedata.normalize("NFKC", text)
    text = "".join(c for c in text if unicodedata.category(c) != "Cf")
    # Phones autocorrect the apostrophe to U+2019; compare both as the ASCII one.
    text = text.casefold().replace("\u2019", "'")
    start, end = 0, len(text)
    while start < end and _trimmed(text[start]):
        start += 1
    while end > start and _trimmed(text[end - 1]):
        end -= 1
    return _SPACE.sub(" ", text[start:end])


def _trimmed(char: str) -> bool:
    return char.isspace() or unicodedata.category(char)[0] in _EDGE_CATEGORIES


def compile_globs(globs: Iterable[str]) -> re.Pattern[str]:
    """One case-insensitive regex for all globs (`*` any run, `?` one character)."""
    parts = ["".join(_glob_char(c) for c in g) for g in globs]
    # ASCII: header names are ASCII, and Unicode folding would let "\u212a" match "k".
    return re.compile("|".join(parts) or "(?!)", re.IGNORECASE | re.ASCII)


def _glob_char(c: str) -> str:
    return ".*" if c == "*" else "." if c == "?" else re.escape(c)


def _covered(glob: str, globs: Iterable[str]) -> bool:
    """Whether `globs` already strip every header `glob` would. Only a plain name can be
    tested by matching its text: a glob's own text matching another glob proves nothing
    ("X-Patient-?" matches the text "X-Patient-*" but strips far less), so a glob with a
    wildcard is covered only by the same glob."""
    globs = list(globs)
    if any(g.lower() == glob.lower() for g in globs):
        return True
    return "*" not in glob and "?" not in glob and compile_globs(globs).fullmatch(glob) is not None


def policy_digest(rules: Rules) -> str:
    """The digest of the rules in force: what they mean, not how the files spell it.

    sha256 over canonical JSON (sorted keys, no spaces, UTF-8) of every value `Rules` was
    built from except `version`: the categories with every field, the defaults, the strip
    globs, the SMS texts, the keyword sets (their floor included) and the revocations.
    Sets are sorted, so file order, the order of list items, whitespace and comments do not
    change it; header names and globs (matched case-insensitively) are lower-cased, and a
    plain name a glob already strips is left out. Any change to a rule changes it. The
    first `POLICY_DIGEST_BYTES` bytes, in hex.
    """
    doc: dict[str, Any] = {"form": POLICY_DIGEST_FORM}
    for f in dataclasses.fields(rules):
        if f.init and f.name != "version":
            doc[f.name] = _canonical(getattr(rules, f.name))
    globs = sorted({g.lower() for g in rules.strip_headers})
    doc["strip_headers"] = [g for g in globs if not _covered(g, [h for h in globs if h != g])]
    doc["category_header"] = rules.category_header.lower()
    raw = orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(raw).digest()[:POLICY_DIGEST_BYTES].hex()


def _canonical(value: Any) -> Any:
    """`value` as JSON data whose form does not depend on the order anything was read in."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: _canonical(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if f.init
        }
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, tuple | list | set | frozenset):
        items = [_canonical(v) for v in value]
        return sorted(items, key=lambda v: orjson.dumps(v, option=orjson.OPT_SORT_KEYS))
    return value
