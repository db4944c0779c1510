"""The shipped policy, and how a rules folder is read, merged and validated
(docs/guarantees.md §9)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from gateway import rules_files
from gateway.config import Sender
from gateway.core import rules as core
from gateway.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "rules"
PACKAGED = REPO / "gateway" / "default_rules"

MINIMAL = """
[defaults]
category = "marketing"

[[categories]]
name = "marketing"
opt_out = true
unsubscribe = true
channels = ["email", "sms"]
"""


def write(folder: Path, **files: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / f"{name}.toml").write_text(text, encoding="utf-8")
    return folder


def problems_of(folder: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        rules_files.load_dir(folder)
    return info.value.problems


def has(problems: list[str], *fragments: str) -> bool:
    return any(all(f in p for f in fragments) for p in problems)


# --- the shipped policy --------------------------------------------------------------------

EXPECTED = {  # name: (opt_out, unsubscribe)
    "marketing": (True, True),
    "fundraising": (True, True),
    "research": (True, True),
    "appointment-reminder": (True, False),
    "refill-reminder": (True, False),
    "billing": (True, False),
    "emergency-alert": (False, False),
}


@pytest.fixture(scope="module")
def shipped() -> core.Rules:
    return rules_files.load_dir(SHIPPED)


def test_shipped_rules_have_every_required_category_with_a_basis(shipped: core.Rules) -> None:
    for name, (opt_out, unsubscribe) in EXPECTED.items():
        cat = shipped.category(name)
        assert cat is not None, name
        assert (cat.opt_out, cat.unsubscribe) == (opt_out, unsubscribe), name
        assert set(cat.channels) == {"email", "sms"}, name
        assert len(cat.basis) > 40, name
    assert "164.514(f)(2)" in shipped.categories["fundraising"].basis
    assert "164.508(a)(3)" in shipped.categories["marketing"].basis


def test_emergency_alert_is_never_suppressed(shipped: core.Rules) -> None:
    cat = shipped.categories["emergency-alert"]
    assert cat.opt_out is False
    assert cat.unsubscribe is False


def test_shipped_defaults(shipped: core.Rules) -> None:
    assert shipped.default_category == "marketing"
    assert shipped.category_header == "X-Optgate-Category"
    assert shipped.sms_footer == "Reply STOP to opt out."
    assert "STOP" in shipped.sms_help
    assert {
        "STOP",
        "STOPALL",
        "UNSUBSCRIBE",
        "CANCEL",
        "END",
        "QUIT",
        "REVOKE",
        "OPTOUT",
        "OPT OUT",
    } <= (shipped.stop_keywords)
    assert shipped.start_keywords == {"START", "UNSTOP", "YES"}
    assert shipped.help_keywords == {"HELP", "INFO"}
    ids = {r.id: r.phrase for r in shipped.revocations}
    assert ids["r-es-alto"] == "alto"
    assert len(shipped.version) == 64


def test_packaged_default_rules_are_byte_identical_to_rules_dir() -> None:
    repo = {p.name: p.read_bytes() for p in SHIPPED.glob("*.toml")}
    packaged = {p.name: p.read_bytes() for p in PACKAGED.glob("*.toml")}
    assert repo
    assert packaged == repo
    assert rules_files.load_dir(PACKAGED).version == rules_files.load_dir(SHIPPED).version


def test_category_lookup_ignores_case_and_unknown_is_none(shipped: core.Rules) -> None:
    assert shipped.category("Appointment-Reminder ") is shipped.categories["appointment-reminder"]
    assert shipped.category("newsletter") is None


def test_rules_are_immutable(shipped: core.Rules) -> None:
    with pytest.raises(TypeError):
        shipped.categories["marketing"] = shipped.categories["billing"]  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        shipped.default_category = "emergency-alert"  # type: ignore[misc]


# --- header stripping ----------------------------------------------------------------------


def test_strips_is_case_insensitive_and_globs(shipped: core.Rules) -> None:
    stripped = [
        "X-Optgate-Category",
        "x-optgate-category",
        "X-OPTGATE-ANYTHING",
        "X-Internal-Ticket",
        "x-patient-mrn",
        "List-Unsubscribe",
        "list-unsubscribe-post",
    ]
    kept = [
        "From",
        "Subject",
        "X-Optgate",
        "X-Internals",
        "X-Patientx-Id",
        "Listless",
        "Message-ID",
        "DKIM-Signature",
        "X-Mailer",
    ]
    assert [n for n in stripped if not shipped.strips(n)] == []
    assert [n for n in kept if shipped.strips(n)] == []


def test_question_mark_glob_matches_one_character(tmp_path: Path) -> None:
    folder = write(tmp_path, a=MINIMAL + '[strip]\nheaders = ["X-Trace-??"]\n')
    r = rules_files.load_dir(folder)
    assert r.strips("x-trace-ab")
    assert not r.strips("X-Trace-abc")
    assert not r.strips("X-Trace-a")


def test_x_optgate_is_always_stripped_even_when_no_file_says_so(tmp_path: Path) -> None:
    folder = write(tmp_path, a=MINIMAL + '[strip]\nheaders = ["X-Other-*"]\n')
    r = rules_files.load_dir(folder)
    assert r.strip_headers[0] == "X-Optgate-*"
    assert r.strips("X-Optgate-Category")
    assert r.strips("X-Other-Thing")
    bare = rules_files.load_dir(write(tmp_path / "bare", a=MINIMAL))  # no [strip] at all
    assert bare.strips("x-optgate-sender")


def test_a_custom_category_header_is_always_stripped(tmp_path: Path) -> None:
    text = MINIMAL.replace(
        'category = "marketing"', 'category = "marketing"\ncategory_header = "X-App-Kind"'
    )
    r = rules_files.load_dir(write(tmp_path, a=text))
    assert r.category_header == "X-App-Kind"
    assert r.strips("x-app-kind")


def test_floor_survives_direct_construction(shipped: core.Rules) -> None:
    r = dataclasses.replace(shipped, strip_headers=("X-Foo",))
    assert r.strips("X-Optgate-Category")
    assert r.strips("x-foo")


# --- errors ---------------------------------------------------------------------------------


def test_many_problems_are_reported_together_each_with_its_file(tmp_path: Path) -> None:
    folder = write(
        tmp_path,
        a="""
[defaults]
category = "newsletter"
colour = "blue"

[[categories]]
name = "marketing"
opt_out = "yes"
unsubscribe = true

[[categories]]
name = "Bad_Name"
opt_out = true
unsubscribe = true

[[categories]]
name = "faxes"
opt_out = true
unsubscribe = true
channels = ["fax"]

[[categories]]
name = "alerts"
opt_out = false
unsubscribe = true
""",
        b="""
[[categories]]
name = "faxes"
opt_out = true
unsubscribe = false

[keywords]
stop = [""]

[strip]
headers = ["*", "X Bad"]

[templates]
x = 1

[[revocations]]
id = "r-en-stop"
phrase = "stop"
""",
    )
    problems = problems_of(folder)
    a, b = str(folder / "a.toml"), str(folder / "b.toml")
    expected = [
        (a, "unknown key 'colour'"),
        (a, "opt_out must be true or false"),
        (a, "'Bad_Name'", "lower-case"),
        (a, "faxes", "unknown channels ['fax']"),
        (a, "alerts", "unsubscribe = true needs opt_out = true"),
        (a, "[defaults] category 'newsletter' is not a defined category"),
        (b, "category 'faxes'", f"already defined in {a}"),
        (b, "[keywords] stop: '' must be 1 to 32 letters or digits"),
        (b, "'*' would strip From"),
        (b, "'X Bad' is not a header-name glob"),
        (b, "unknown table [templates]"),
        (b, "r-en-stop", "repeats the keyword 'STOP'"),
    ]
    for fragments in expected:
        assert has(problems, *fragments), (fragments, problems)
    assert all(p.startswith((a, b)) for p in problems), problems


def test_duplicate_category_across_files_names_both(tmp_path: Path) -> None:
    folder = write(
        tmp_path, a=MINIMAL, b=MINIMAL.split("[[categories]]")[1].join(["[[categories]]", ""])
    )
    problems = problems_of(folder)
    assert problems == [
        f"{folder / 'b.toml'}: category 'marketing': already defined in {folder / 'a.toml'}"
    ]


def test_a_single_value_set_in_two_files_is_an_error(tmp_path: Path) -> None:
    folder = write(
        tmp_path,
        a=MINIMAL + '[sms]\nfooter = "Reply STOP to end."\n',
        b='[sms]\nfooter = "Text STOP to opt out."\n',
    )
    assert has(problems_of(folder), "b.toml", "[sms] footer is already set in", "a.toml")


def test_toml_syntax_error_names_the_file_and_line(tmp_path: Path) -> None:
    folder = write(tmp_path, a=MINIMAL, b='[strip]\nheaders = ["X-Foo-*"\n\n[sms]\n')
    problems = problems_of(folder)
    assert len(problems) == 1
    assert problems[0].startswith(f"{folder / 'b.toml'}: invalid TOML")
    assert "line" in problems[0]


def test_default_category_must_be_opt_outable(tmp_path: Path) -> None:
    text = MINIMAL.replace('category = "marketing"', 'category = "emergency-alert"') + (
        '[[categories]]\nname = "emergency-alert"\nopt_out = false\nunsubscribe = false\n'
    )
    assert has(problems_of(write(tmp_path, a=text)), "'emergency-alert' must be opt-outable")


def test_missing_default_and_reserved_name(tmp_path: Path) -> None:
    folder = write(tmp_path, a='[[categories]]\nname = "all"\nopt_out = true\nunsubscribe = true\n')
    problems = problems_of(folder)
    assert has(problems, "no file sets [defaults] category")
    assert has(problems, "'all'", "reserved")


def test_sms_footer_must_say_how_to_opt_out(tmp_path: Path) -> None:
    folder = write(tmp_path, a=MINIMAL + '[sms]\nfooter = "Thanks for reading."\n')
    assert has(problems_of(folder), "[sms] footer must name a stop keyword")


def test_keyword_in_two_lists_is_an_error(tmp_path: Path) -> None:
    folder = write(tmp_path, a=MINIMAL + '[keywords]\nstart = ["START", "stop"]\n')
    assert has(problems_of(folder), "'STOP' is both a stop and a start keyword")


def test_empty_and_missing_folders(tmp_path: Path) -> None:
    assert has(problems_of(tmp_path), "holds no .toml files")
    assert has(problems_of(tmp_path / "nope"), "does not exist")


def test_dot_files_are_ignored(tmp_path: Path) -> None:
    folder = write(tmp_path, a=MINIMAL)
    (folder / ".#a.toml").write_text("this is an editor lock file [", encoding="utf-8")
    assert rules_files.load_dir(folder).default_category == "marketing"


# --- keywords ------------------------------------------------------------------------------


def test_stop_floor_cannot_be_removed(tmp_path: Path) -> None:
    r = rules_files.load_dir(write(tmp_path, a=MINIMAL + '[keywords]\nstop = ["ARRET"]\n'))
    assert core.ALWAYS_STOP | {"ARRET"} <= r.stop_keywords
    assert "HELP" in r.help_keywords


@pytest.mark.parametrize(
    ("text", "kind", "matched"),
    [
        ("STOP", "stop", "STOP"),
        ("  Stop! ", "stop", "STOP"),
        ("opt   out", "stop", "OPT OUT"),
        ("¡Alto!", "stop", "r-es-alto"),
        ("No más mensajes.", "stop", "r-es-no-mas-mensajes"),
        ("Don\u2019t text me", "stop", "r-en-dont-text-me"),
        ("unstop", "start", "UNSTOP"),
        ("info", "help", "INFO"),
    ],
)
def test_keyword_matches_whole_replies(
    shipped: core.Rules, text: str, kind: str, matched: str
) -> None:
    assert shipped.keyword(text) == core.KeywordMatch(kind=kind, matched=matched)  # type: ignore[arg-type]


@pytest.mark.parametrize("text", ["please don't stop", "alto ya", "stopping by at 5", "", "no"])
def test_keyword_never_matches_inside_a_longer_message(shipped: core.Rules, text: str) -> None:
    assert shipped.keyword(text) is None


# --- choosing the folder and versions ---------------------------------------------------------


def test_choose_dir(tmp_path: Path) -> None:
    configured = tmp_path / "elsewhere"
    assert rules_files.choose_dir(configured, tmp_path) == configured
    assert rules_files.choose_dir(None, tmp_path) == PACKAGED
    assert rules_files.choose_dir(None, tmp_path).is_dir()
    (tmp_path / "rules").mkdir()
    assert rules_files.choose_dir(None, tmp_path) == tmp_path / "rules"


def test_version_changes_with_content_not_location(tmp_path: Path) -> None:
    one = rules_files.load_dir(write(tmp_path / "one", a=MINIMAL))
    two = rules_files.load_dir(write(tmp_path / "two", a=MINIMAL))
    three = rules_files.load_dir(write(tmp_path / "three", a=MINIMAL + "\n"))
    renamed = rules_files.load_dir(write(tmp_path / "four", b=MINIMAL))
    assert one.version == two.version
    assert len({one.version, three.version, renamed.version}) == 3


def test_a_default_category_outside_the_senders_grant_is_a_config_error() -> None:
    rules = rules_files.load_dir(rules_files.packaged_dir())
    ok = [
        Sender(name="a", default_category="emergency-alert", categories=("emergency-alert",)),
        Sender(name="b"),
        Sender(name="c", default_category="billing"),
        Sender(name="d", categories=("billing",)),  # no default: refused at send time instead
    ]
    rules_files.check_senders(rules, ok)
    bad = [
        Sender(name="x", default_category="emergency-alert"),
        Sender(name="y", default_category="marketing", categories=("billing",)),
        Sender(name="z", default_category="nope"),
    ]
    with pytest.raises(ConfigError) as info:
        rules_files.check_senders(rules, bad)
    assert [p.split(":")[0] for p in info.value.problems] == [
        "[[senders]] x",
        "[[senders]] y",
        "[[senders]] z",
    ]
