"""Parsing a rules folder's documents into one `Rules` (`parse`), and its version
(`version_of`): every problem found, each prefixed with its file, in one `ConfigError`.
What the documents may hold, how files merge and the floors no file can lower are in
`gateway.core.rules`."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from gateway.core.rules import (
    ALWAYS_HELP,
    ALWAYS_START,
    ALWAYS_STOP,
    CHANNELS,
    CONSENT_VALUES,
    DEFAULT_CATEGORY_HEADER,
    DEFAULT_FOOTER,
    DEFAULT_HELP,
    DEFAULT_START_REPLY,
    DEFAULT_STOP_REPLY,
    MAX_FOOTER_CHARS,
    MAX_KEYWORD_CHARS,
    MAX_NAME_CHARS,
    MAX_PHRASE_CHARS,
    MAX_REPLY_CHARS,
    PROTECTED_HEADERS,
    RESERVED_NAMES,
    Category,
    Revocation,
    Rules,
    compile_globs,
    normalise_reply,
)
from gateway.errors import ConfigError

_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?")
_HEADER_NAME = re.compile(r"[!-9;-~]+")  # RFC 5322 ftext: printable ASCII except ':'
_GLOB = re.compile(r"[A-Za-z0-9!#$%&'+\-.^_`|~*?]+")  # header token characters plus * and ?
_KEYWORD = re.compile(r"[^\W_]+(?:[ -][^\W_]+)*")  # words of letters/digits, one space or '-'
_NAME_RULE = f"must be 1 to {MAX_NAME_CHARS} lower-case letters, digits and inner '-'"
_KEYWORD_RULE = f"must be 1 to {MAX_KEYWORD_CHARS} letters or digits (words joined by ' ' or '-')"


def _is_name(name: str) -> bool:
    return len(name) <= MAX_NAME_CHARS and _NAME.fullmatch(name) is not None


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
                   "basis": str, "consent": str},
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
        consent = entry.get("consent", "none")
        if consent not in CONSENT_VALUES:
            self.problems.append(f'{where}: consent must be "required" or "none"')
        elif consent == "required" and not entry["opt_out"]:
            self.problems.append(
                f'{where}: consent = "required" needs opt_out = true (an opt-out always '
                "wins over a consent, so a consent-required category must be opt-outable)"
            )
        if name in self.categories:
            self.problems.append(f"{where}: already defined in {self.category_file[name]}")
            return
        self.categories[name] = Category(
            name=name,
            opt_out=entry["opt_out"],
            unsubscribe=entry["unsubscribe"],
            channels=tuple(channels),
            basis=entry.get("basis", "").strip(),
            consent_required=consent == "required",
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
