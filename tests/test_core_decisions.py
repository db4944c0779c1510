"""The email and shared decision core (`gateway.core.mail`, `gateway.core.categories`):
facts in, values out, no sockets. What each case blocks is in its id."""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gateway import rules_files
from gateway.core import categories, mail, policy
from gateway.core import message as msg
from gateway.core.categories import Unchosen, Why
from gateway.core.mail import Plan, Refusal, Reply
from gateway.core.policy import Decision
from gateway.core.records import Record
from gateway.core.rules import Category, Rules

DEFAULT_RULES = Path(rules_files.__file__).parent / rules_files.PACKAGE_RULES
EXTRA = """
[[categories]]
name = "letters"
opt_out = true
unsubscribe = false
channels = ["email"]
basis = "email only"
"""


@pytest.fixture(scope="module")
def rules(tmp_path_factory: pytest.TempPathFactory) -> Rules:
    folder = tmp_path_factory.mktemp("rules")
    for f in DEFAULT_RULES.glob("*.toml"):
        shutil.copy(f, folder / f.name)
    (folder / "letters.toml").write_text(EXTRA)
    return rules_files.load_dir(folder)


def head(*fields: str) -> msg.Head:
    return msg.parse_head(("".join(f + "\r\n" for f in fields) + "\r\nbody\r\n").encode())


def chosen(
    rules: Rules, *fields: str, default: str = "", granted: tuple[str, ...] | None = None
) -> str:
    got = mail.category(rules, head(*fields), default=default, granted=granted)
    return got.name if isinstance(got, Category) else str(got.reply)


# -- category choice ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "default", "expected"),
    [
        (("X-Optgate-Category: billing",), "research", "billing"),
        (("X-Optgate-Category:  BILLING ",), "", "billing"),
        ((), "research", "research"),
        ((), "", "marketing"),
        (("X-Optgate-Category: billing", "X-Optgate-Category: Billing"), "", "billing"),
    ],
    ids=[
        "header-wins-over-sender-default",
        "header-matched-without-case-or-space",
        "sender-default-wins-over-rules-default",
        "rules-default-when-nothing-named",
        "same-category-twice-is-one",
    ],
)
def test_category_precedence(
    rules: Rules, fields: tuple[str, ...], default: str, expected: str
) -> None:
    assert chosen(rules, *fields, default=default) == expected


@pytest.mark.parametrize(
    ("fields", "granted", "reply", "category"),
    [
        (
            ("X-Optgate-Category: billing", "X-Optgate-Category: research"),
            None,
            "550 5.7.1 More than one category header",
            "",
        ),
        (("X-Optgate-Category: nope",), None, "550 5.7.1 Unknown category", ""),
        (("X-Optgate-Category: \u212aey",), None, "550 5.7.1 Unknown category", ""),
        (
            ("X-Optgate-Category: emergency-alert",),
            None,
            "550 5.7.1 Category not permitted for this sender",
            "emergency-alert",
        ),
        (
            ("X-Optgate-Category: research",),
            ("billing",),
            "550 5.7.1 Category not permitted for this sender",
            "research",
        ),
    ],
    ids=[
        "two-different-category-headers",
        "unknown-category",
        "kelvin-sign-folded-to-ascii",
        "no-lookup-category-without-grant",
        "category-outside-the-grant-list",
    ],
)
def test_category_refusals(
    rules: Rules,
    fields: tuple[str, ...],
    granted: tuple[str, ...] | None,
    reply: str,
    category: str,
) -> None:
    got = mail.category(rules, head(*fields), default="", granted=granted)
    assert isinstance(got, Refusal)
    assert (str(got.reply), got.category, got.decision.verdict.value) == (reply, category, "reject")


def test_category_not_for_the_channel(rules: Rules) -> None:
    # email: refused as not sent by email; SMS: the shared rule says which one it was
    got = categories.choose(rules, asked=("letters",), default="", granted=None, channel="sms")
    assert isinstance(got, Unchosen) and got.why is Why.NOT_FOR_CHANNEL
    assert got.category is not None and got.category.name == "letters"
    assert chosen(rules, "X-Optgate-Category: letters") == "letters"


def test_shared_choice_is_the_same_for_sms(rules: Rules) -> None:
    def sms(
        asked: tuple[str, ...], default: str = "", granted: tuple[str, ...] | None = None
    ) -> object:
        got = categories.choose(rules, asked=asked, default=default, granted=granted, channel="sms")
        return got.name if isinstance(got, Category) else got.why

    assert sms(("billing",), "research") == "billing"
    assert sms((), "research") == "research"
    assert sms(()) == "marketing"
    assert sms(("nope",)) is Why.UNKNOWN
    assert sms(("emergency-alert",)) is Why.NOT_PERMITTED
    assert sms(("emergency-alert",), granted=("emergency-alert",)) == "emergency-alert"


# -- refusals before any lookup ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "reply", "rule"),
    [
        (
            b"Subject: x\r\n\r\nbody\n.\r\n",
            "554 5.6.0 Bare CR or LF in message content",
            "smtp.bare-cr-lf",
        ),
        (
            b"Subject x\r\n\r\nbody\r\n",
            "554 5.6.0 Malformed header section",
            "smtp.malformed-header",
        ),
    ],
    ids=["bare-lf-smuggling", "malformed-header-section"],
)
def test_message_refused_unread(data: bytes, reply: str, rule: str) -> None:
    got = mail.read(data)
    assert isinstance(got, Refusal)
    assert (str(got.reply), got.decision.rule) == (reply, rule)


def test_from_binding() -> None:
    bound = ("a.example",)
    assert mail.bind_from(head("From: x@a.example"), bound) == mail.Bound(domain="a.example")
    refused = mail.bind_from(head("From: x@mail.a.example"), bound)
    assert isinstance(refused, Refusal)
    assert str(refused.reply) == "553 5.7.1 From domain not permitted for this sender"
    assert refused.decision.rule == "sender.from_domains"
    assert isinstance(mail.bind_from(head("From: x@a.example, y@a.example"), bound), Refusal)
    assert mail.bind_from(head("From: x@b.example"), ()) == mail.Bound(domain="b.example")


# -- verdicts and the plan -----------------------------------------------------------------------


def test_verdicts_split_the_states_per_recipient(rules: Rules) -> None:
    billing = rules.category("billing")
    assert billing is not None
    out = Record(all=True)
    # the first recipient's second key form is opted out; the second recipient is not
    got = mail.verdicts(billing, [None, out, None], [2, 1])
    assert got == [policy.OPTED_OUT_ALL, policy.NOT_OPTED_OUT]
    alert = rules.category("emergency-alert")
    assert alert is not None
    assert mail.verdicts(alert, [], [1, 1]) == [policy.NOT_OPT_OUTABLE] * 2


ALLOW, SUPPRESS = policy.NOT_OPTED_OUT, policy.OPTED_OUT_ALL


@pytest.mark.parametrize(
    ("decisions", "delivered", "suppressed_reply", "expected"),
    [
        (
            [SUPPRESS, SUPPRESS],
            [False, False],
            "accept",
            "250 2.0.0 Ok: message suppressed, 2 of 2 recipients suppressed",
        ),
        (
            [SUPPRESS],
            [False],
            "reject",
            "550 5.7.1 Message not delivered: every recipient has opted out",
        ),
        (
            [ALLOW, policy.RECORD_CORRUPT],
            [False, False],
            "accept",
            "451 4.3.0 Temporary lookup failure, try again later",
        ),
        (
            [ALLOW, SUPPRESS],
            [True, False],
            "accept",
            "250 2.0.0 Ok: already delivered upstream, 1 of 2 recipients suppressed",
        ),
        (
            [ALLOW, SUPPRESS, ALLOW],
            [True, False, False],
            "accept",
            Plan(send=(2,), summary="1 of 3 recipients suppressed"),
        ),
    ],
    ids=[
        "all-suppressed-accepted",
        "all-suppressed-rejected",
        "one-record-in-doubt-defers-all",
        "retry-after-4xx-sends-nothing-twice",
        "send-only-allowed-not-yet-delivered",
    ],
)
def test_plan(
    decisions: list[Decision], delivered: list[bool], suppressed_reply: str, expected: str | Plan
) -> None:
    got = mail.plan(decisions, delivered, suppressed_reply)
    assert (str(got) if isinstance(got, Reply) else got) == expected


# -- the reply for the upstream's outcomes -------------------------------------------------------


@dataclass(frozen=True)
class Out:
    accepted: tuple[str, ...] = ()
    temp_failed: Mapping[str, tuple[int, str]] = field(default_factory=dict)
    perm_failed: Mapping[str, tuple[int, str]] = field(default_factory=dict)


TXN = mail.Txn(sender="app", txn="t1", category="billing", message_id="m1")
PS = {"a@x.example": "psA", "b@x.example": "psB", "c@x.example": "psC"}
SUMMARY = "0 of 2 recipients suppressed"


@pytest.mark.parametrize(
    ("outcomes", "reply", "remember"),
    [
        (
            [Out(accepted=("a@x.example", "b@x.example"))],
            "250 2.0.0 Ok: delivered upstream, 0 of 2 recipients suppressed",
            (),
        ),
        (
            [Out(accepted=("a@x.example",)), Out(temp_failed={"b@x.example": (450, "4.2.1 busy")})],
            "451 4.4.0 Upstream did not accept the message (450), try again later",
            ("psA",),
        ),
        (
            [Out(temp_failed={"a@x.example": (421, "4.7.0 try later")})],
            "451 4.7.0 Upstream did not accept the message (421), try again later",
            (),
        ),
        (
            [
                Out(
                    perm_failed={
                        "a@x.example": (550, "5.1.1 no such user"),
                        "b@x.example": (552, "5.3.4 too big"),
                    }
                )
            ],
            "550 5.1.1 Upstream rejected the message",
            (),
        ),
        (
            [Out(accepted=("a@x.example",)), Out(perm_failed={"b@x.example": (550, "5.1.1 no")})],
            "250 2.0.0 Ok: delivered upstream, 0 of 2 recipients suppressed, 1 rejected upstream",
            (),
        ),
        (
            [Out(perm_failed={"a@x.example": mail.SIGNING_FAILED})],
            "554 5.6.0 Upstream rejected the message",
            (),
        ),
        (
            [
                Out(accepted=("a@x.example",)),
                Out(temp_failed={"b@x.example": mail.SIGNING_UNAVAILABLE}),
            ],
            "451 4.4.0 Upstream did not accept the message (451), try again later",
            ("psA",),
        ),
    ],
    ids=[
        "all-accepted",
        "partial-4xx-remembers-accepted-copies",
        "upstream-4.7.0-kept",
        "all-5xx-first-reply-wins",
        "mixed-5xx-and-accepted-is-250",
        "dkim-permanent-failure",
        "dkim-unavailable-with-accepted-copy",
    ],
)
def test_conclude(outcomes: list[Out], reply: str, remember: tuple[str, ...]) -> None:
    done = mail.conclude(TXN, outcomes, PS, SUMMARY)
    assert str(done.reply) == reply
    assert done.remember == remember
    sent = sum(len(o.accepted) + len(o.temp_failed) + len(o.perm_failed) for o in outcomes)
    assert len(done.deliveries) == sent
    assert {d.fields()["recipient"] for d in done.deliveries} <= set(PS.values())


def test_delivery_and_decision_entries() -> None:
    done = mail.conclude(TXN, [Out(temp_failed={"a@x.example": (450, "4.2.1 busy")})], PS, SUMMARY)
    assert [d.fields() for d in done.deliveries] == [
        {"event": "delivery", "channel": "email", "sender": "app", "txn": "t1",
         "category": "billing", "recipient": "psA", "message_id": "m1", "outcome": "deferred",
         "code": 450}
    ]  # fmt: skip
    (entry,) = TXN.decisions(["psB"], [SUPPRESS])
    assert entry.fields() == {
        "event": "decision", "channel": "email", "sender": "app", "txn": "t1",
        "decision": "suppress", "category": "billing", "recipient": "psB", "message_id": "m1",
        "rule": "optout.all", "reason": "opted-out-all",
    }  # fmt: skip


def test_core_imports_no_io() -> None:
    import ast

    banned = {"asyncio", "aiohttp", "aiosmtpd", "aiosmtplib", "redis", "structlog", "socket"}
    for path in (Path(mail.__file__).parent).glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = (
                [a.name for a in node.names] if isinstance(node, ast.Import)
                else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            )  # fmt: skip
            for name in names:
                assert name.split(".")[0] not in banned, (path.name, name)
