"""The rules: categories, classification, header stripping, SMS texts and keywords.

Pure (SPEC §8, §11): `parse()` takes the decoded TOML documents of a rules folder, each
with its file name, and returns one immutable `Rules`, or raises one `ConfigError` naming
every problem, each prefixed with the file it is in. Reading the folder is
`gateway.rules_files`.

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

import hashlib
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from gateway.errors import ConfigError

CHANNELS = frozenset({"email", "sms"})
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

_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?")
_HEADER_NAME = re.compile(r"[!-9;-~]+")  # RFC 5322 ftext: printable ASCII except ':'
_GLOB = re.compile(r"[A-Za-z0-9!#$%&'+\-.^_`|~*?]+")  # header token characters plus * and ?
_KEYWORD = re.compile(r"[^\W_]+(?:[ -][^\W_]+)*")  # words of letters/digits, one space or '-'
_NAME_RULE = f"must be 1 to {MAX_NAME_CHARS} lower-case letters, digits and inner '-'"
_KEYWORD_RULE = f"must be 1 to {MAX_KEYWORD_CHARS} letters or digits (words joined by ' ' or '-')"
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
    _strip: re.Pattern[str] = field(init=False, repr=False, compare=False)
    _phrases: Mapping[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "categories", MappingProxyType(dict(self.categories)))
        strip: list[str] = []
        for glob in (*ALWAYS_STRIP, *self.strip_headers, self.category_header):
            # The floor lives here so no way of building Rules can drop it. Skip what an
            # earlier glob already covers (a glob's own text matches that glob).
            if not compile_globs(strip).fullmatch(glob):
                strip.append(glob)
        object.__setattr__(self, "strip_headers", tuple(strip))
        object.__setattr__(self, "_strip", compile_globs(strip))
        phrases = {r.phrase: r.id for r in self.revocations}
        object.__setattr__(self, "_phrases", MappingProxyType(phrases))

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


def _is_name(name: str) -> bool:
    return len(name) <= MAX_NAME_CHARS and _NAME.fullmatch(name) is not None


def _glob_char(c: str) -> str:
    return ".*" if c == "*" else "." if c == "?" else re.escape(c)


def version_of(files: Iterable[tuple[str, bytes]]) -> str:
    """sha256 over each file's name and bytes, length-prefixed so no two sets collide."""
    h = hashlib.sha256()
    for name, data in sorted(files):
        raw = name.encode("utf-8")
        h.update(len(raw).to_bytes(8, "big") + raw + len(data).to_bytes(8, "big") + data)
    return h.hexdigest()


_TABLES: dict[str, dict[str, type]] = {
    "defaults": {"category": str, "category_header": str},
    "categories": {"name": str, "opt_out": bool, "unsubscribe": bool, "channels": list,
                   "basis": str},
    "strip": {"headers": list},
    "sms": {"footer": str, "help": str, "stop_reply": str, "start_reply": str},
    "keywords": {"stop": list, "start": list, "help": list},
    "revocations": {"id": str, "phrase": str},
}  # fmt: skip
_KINDS = {bool: "true or false", str: "a string", list: "an array"}
_ARRAYS = frozenset({"categories", "revocations"})  # [[arrays of tables]]
_REQUIRED = {"categories": ("name", "opt_out", "unsubscribe"), "revocations": ("id", "phrase")}


class _Builder:
    """Collects the merged contents of every file and every problem found on the way."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.categories: dict[str, Category] = {}
        self.category_file: dict[str, str] = {}
        self.single: dict[str, tuple[str, str]] = {}  # "[sms] footer" -> (value, file)
        self.globs: list[str] = []
        self.keywords: dict[str, dict[str, str]] = {"stop": {}, "start": {}, "help": {}}
        self.revocations: dict[str, tuple[Revocation, str]] = {}

    def add_document(self, file: str, doc: Mapping[str, Any]) -> None:
        for table, value in doc.items():
            schema = _TABLES.get(table)
            if schema is None:
                self.problems.append(f"{file}: unknown table [{table}]")
            elif table in _ARRAYS:
                if not isinstance(value, list):
                    self.problems.append(f"{file}: {table} must be an array of tables [[{table}]]")
                    continue
                for i, item in enumerate(value):
                    where = f"{file}: [[{table}]] #{i + 1}"
                    entry = self._check(where, schema, item, _REQUIRED[table])
                    if entry is not None and table == "categories":
                        self._category(file, where, entry)
                    elif entry is not None:
                        self._revocation(file, where, entry)
            else:
                entry = self._check(f"{file}: [{table}]", schema, value, ())
                if entry is not None:
                    self._table(file, table, entry)

    def _check(
        self, where: str, schema: Mapping[str, type], value: Any, required: Sequence[str]
    ) -> dict[str, Any] | None:
        if not isinstance(value, dict):
            self.problems.append(f"{where}: must be a table")
            return None
        out: dict[str, Any] = {}
        for key, item in value.items():
            want = schema.get(key)
            if want is None:
                self.problems.append(f"{where}: unknown key {key!r}")
            elif (want is not bool and isinstance(item, bool)) or not isinstance(item, want):
                self.problems.append(f"{where}: {key} must be {_KINDS[want]}")
            else:
                out[key] = item
        missing = [k for k in required if k not in value]
        if missing:
            self.problems.append(f"{where}: missing {', '.join(missing)}")
        # A required key that is missing or mistyped has been reported: skip the entry.
        return out if all(k in out for k in required) else None

    def _strings(self, where: str, items: list[Any]) -> list[str]:
        bad = [x for x in items if not isinstance(x, str)]
        if bad:
            self.problems.append(f"{where}: every item must be a string, got {bad[0]!r}")
        return [x for x in items if isinstance(x, str)]

    def _category(self, file: str, where: str, entry: dict[str, Any]) -> None:
        name = entry["name"]
        if not _is_name(name):
            self.problems.append(f"{where}: name {name!r} {_NAME_RULE}")
            return
        where = f"{file}: category {name!r}"
        if name in RESERVED_NAMES:
            self.problems.append(f"{where}: the name is reserved (it means every category)")
        channels = self._strings(f"{where} channels", entry.get("channels", sorted(CHANNELS)))
        unknown = sorted(set(channels) - CHANNELS)
        if unknown:
            self.problems.append(f"{where}: unknown channels {unknown} (expected email, sms)")
        if not channels or len(set(channels)) != len(channels):
            self.problems.append(f"{where}: channels must list email and/or sms once each")
        if entry["unsubscribe"] and not entry["opt_out"]:
            self.problems.append(f"{where}: unsubscribe = true needs opt_out = true")
        if name in self.categories:
            self.problems.append(f"{where}: already defined in {self.category_file[name]}")
            return
        self.categories[name] = Category(
            name=name,
            opt_out=entry["opt_out"],
            unsubscribe=entry["unsubscribe"],
            channels=tuple(channels),
            basis=entry.get("basis", "").strip(),
        )
        self.category_file[name] = file

    def _revocation(self, file: str, where: str, entry: dict[str, Any]) -> None:
        rid, phrase, p = entry["id"], normalise_reply(entry["phrase"]), self.problems
        if not _is_name(rid):
            p.append(f"{where}: id {rid!r} {_NAME_RULE}")
        elif rid in self.revocations:
            p.append(f"{where}: id {rid!r} already defined in {self.revocations[rid][1]}")
        elif not phrase or len(phrase) > MAX_PHRASE_CHARS or not phrase.isprintable():
            p.append(f"{where}: phrase must be 1 to {MAX_PHRASE_CHARS} printable characters")
        else:
            self.revocations[rid] = (Revocation(id=rid, phrase=phrase), file)

    def _table(self, file: str, table: str, entry: dict[str, Any]) -> None:
        if table == "strip":
            for glob in self._strings(f"{file}: [strip] headers", entry.get("headers", [])):
                self._glob(file, glob)
            return
        if table == "keywords":
            for kind, items in entry.items():
                for word in self._strings(f"{file}: [keywords] {kind}", items):
                    key = normalise_reply(word).upper()
                    if not key or len(key) > MAX_KEYWORD_CHARS or not _KEYWORD.fullmatch(key):
                        self.problems.append(f"{file}: [keywords] {kind}: {word!r} {_KEYWORD_RULE}")
                    else:
                        self.keywords[kind].setdefault(key, file)
            return
        for key, value in entry.items():
            if f"[{table}] {key}" in self.single:
                where = self.single[f"[{table}] {key}"][1]
                self.problems.append(f"{file}: [{table}] {key} is already set in {where}")
            self.single.setdefault(f"[{table}] {key}", (value, file))

    def _glob(self, file: str, glob: str) -> None:
        where = f"{file}: [strip] headers"
        if not _GLOB.fullmatch(glob):
            self.problems.append(f"{where}: {glob!r} is not a header-name glob")
            return
        pattern = compile_globs([glob])
        hits = [h for h in PROTECTED_HEADERS if pattern.fullmatch(h)]
        if hits:
            self.problems.append(f"{where}: {glob!r} would strip {', '.join(hits)}")
        elif glob.lower() not in (g.lower() for g in self.globs):
            self.globs.append(glob)

    def finish(self, *, version: str) -> Rules:
        header = self._defaults()
        stop, start, help_ = self._keyword_sets()
        texts = self._texts(stop)
        revocations = self._revocations(stop | start | help_)
        if self.problems:
            raise ConfigError(self.problems)
        return Rules(
            categories=self.categories,
            default_category=self.single["[defaults] category"][0],
            category_header=header,
            strip_headers=tuple(self.globs),
            sms_footer=texts["footer"],
            sms_help=texts["help"],
            sms_stop_reply=texts["stop_reply"],
            sms_start_reply=texts["start_reply"],
            stop_keywords=stop,
            start_keywords=start,
            help_keywords=help_,
            revocations=revocations,
            version=version,
        )

    def _value(self, key: str, default: str) -> tuple[str, str]:
        value, file = self.single.get(key, (default, "rules"))
        return value.strip(), file

    def _defaults(self) -> str:
        p = self.problems
        default, file = self._value("[defaults] category", "")
        cat = self.categories.get(default)
        if not default:
            p.append("rules: no file sets [defaults] category")
        elif cat is None:
            p.append(f"{file}: [defaults] category {default!r} is not a defined category")
        elif not cat.opt_out:
            p.append(
                f"{file}: [defaults] category {default!r} must be opt-outable (opt_out = true)"
            )
        header, file = self._value("[defaults] category_header", DEFAULT_CATEGORY_HEADER)
        if not _HEADER_NAME.fullmatch(header):
            p.append(f"{file}: [defaults] category_header {header!r} is not a header name")
        return header

    def _keyword_sets(self) -> tuple[frozenset[str], frozenset[str], frozenset[str]]:
        found = self.keywords
        stop = frozenset(ALWAYS_STOP | found["stop"].keys())
        start = frozenset(ALWAYS_START | found["start"].keys())
        help_ = frozenset(ALWAYS_HELP | found["help"].keys())
        for a, b, both in (
            ("stop", "start", stop & start),
            ("stop", "help", stop & help_),
            ("start", "help", start & help_),
        ):
            for word in sorted(both):
                file = found[b].get(word) or found[a].get(word, "rules")
                self.problems.append(f"{file}: [keywords] {word!r} is both a {a} and a {b} keyword")
        return stop, start, help_

    def _texts(self, stop: frozenset[str]) -> dict[str, str]:
        texts: dict[str, str] = {}
        for key, fallback, limit in (
            ("footer", DEFAULT_FOOTER, MAX_FOOTER_CHARS),
            ("help", DEFAULT_HELP, MAX_REPLY_CHARS),
            ("stop_reply", DEFAULT_STOP_REPLY, MAX_REPLY_CHARS),
            ("start_reply", DEFAULT_START_REPLY, MAX_REPLY_CHARS),
        ):
            text, file = self._value(f"[sms] {key}", fallback)
            texts[key] = " ".join(text.split())
            if not texts[key] or len(texts[key]) > limit:
                self.problems.append(f"{file}: [sms] {key} must be 1 to {limit} characters")
            elif key in ("footer", "help") and not any(
                re.search(rf"\b{re.escape(word)}\b", texts[key], re.IGNORECASE) for word in stop
            ):
                # CTIA: the footer and HELP reply must say how to opt out.
                self.problems.append(f"{file}: [sms] {key} must name a stop keyword")
        return texts

    def _revocations(self, keywords: frozenset[str]) -> tuple[Revocation, ...]:
        seen: dict[str, str] = {}
        for rev, file in self.revocations.values():
            where = f"{file}: revocation {rev.id!r}"
            if rev.phrase.upper() in keywords:
                self.problems.append(f"{where} repeats the keyword {rev.phrase.upper()!r}")
            elif rev.phrase in seen:
                self.problems.append(f"{where} repeats the phrase of {seen[rev.phrase]!r}")
            seen.setdefault(rev.phrase, rev.id)
        return tuple(rev for rev, _ in self.revocations.values())


def parse(docs: Sequence[tuple[str, Mapping[str, Any]]], *, version: str) -> Rules:
    """Merge the documents of one rules folder into `Rules`.

    `docs` pairs each file name with its decoded TOML. Raises one `ConfigError` whose
    `problems` name every mistake in every file.
    """
    builder = _Builder()
    for file, doc in docs:
        builder.add_document(file, doc)
    return builder.finish(version=version)
