"""Audit rotation by size and day, checkpoints per closed file, retention, and tail.

Audit-log tampering (edits, deletions, reordering, a dropped middle file and a dropped
newest file) is detected by `verify_path` on the directory; retention prunes
whole old files, says so in the log, and verification still passes.
"""

from __future__ import annotations

import itertools
import random
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.audit import files, tail
from gateway.audit.retention import prune_directory
from gateway.audit.verify import verify_path
from gateway.audit.writer import AuditWriter
from gateway.core.keys import Keyring, generate
from gateway.errors import AuditError
from tests.support.entries import Sample

DAY1 = datetime(2026, 11, 23, 12, 0, 0, tzinfo=UTC).timestamp()
STREAM = "gw1"
SMALL = 2048  # bytes per file: about six entries


class Clock:
    def __init__(self, t: float = DAY1) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def ring() -> Keyring:
    return generate()


def writer(directory: Path, ring: Keyring, clock: Clock, **kw: Any) -> AuditWriter:
    return AuditWriter(
        directory, instance="i1", stream=kw.pop("stream", STREAM), keyring=ring, clock=clock, **kw
    )


def decision(n: int) -> Sample:
    return Sample(decision="suppress", recipient=f"{n:032x}", txn=n)


async def write_rotated(
    directory: Path, ring: Keyring, *, days: int = 3, per_day: int = 15
) -> list[Path]:
    """`days` days of `per_day` entries each, rotating by size within a day too."""
    clock = Clock()
    w = writer(directory, ring, clock, max_file_bytes=SMALL)
    await w.open()
    n = 0
    for _ in range(days):
        for _ in range(per_day):
            n += 1
            await w.append([decision(n)])
        clock.t += 86_400
    await w.close()
    return [p for _, _, p in files.stream_files(directory, STREAM)]


def entries(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


async def test_rotation_by_size_and_day_carries_the_chain(tmp_path: Path, ring: Keyring) -> None:
    paths = await write_rotated(tmp_path, ring)
    names = [p.name for p in paths]
    assert names[0] == "gw1-2026-11-23.jsonl"
    assert "gw1-2026-11-23.1.jsonl" in names and "gw1-2026-11-25.jsonl" in names
    assert all(p.stat().st_size <= SMALL for p in paths)
    seqs = [e["seq"] for p in paths for e in entries(p)]
    assert seqs == list(range(1, 46))
    for before, after in itertools.pairwise(paths):
        assert entries(after)[0]["prev"] == entries(before)[-1]["mac"]
        ckpt = orjson.loads(files.ckpt_path(before).read_bytes())
        assert ckpt["event"] == "checkpoint" and ckpt["next"] == after.name
        assert (ckpt["first_seq"], ckpt["last_seq"]) == (
            entries(before)[0]["seq"],
            entries(before)[-1]["seq"],
        )
        assert ckpt["prev"] == entries(before)[-1]["mac"]
    assert not files.ckpt_path(paths[-1]).exists()  # the current file stays open
    assert oct(files.ckpt_path(paths[0]).stat().st_mode & 0o777) == "0o600"
    assert verify_path(tmp_path, ring).ok and verify_path(tmp_path, ring).entries == 45


@pytest.mark.parametrize(
    ("mutate", "expect_file", "why"),
    [
        ("edit", "middle", "mac mismatch"),
        ("delete_line", "middle", "seq"),
        ("swap_lines", "middle", "chain broken between files"),
        ("drop_middle", "after_middle", "chain broken between files"),
        ("drop_tail", "tail", "missing: named as the next file"),
        ("empty_tail", "tail", "empty, but"),
        ("drop_head", "second", "stream starts at seq"),
        ("forge_checkpoint", "middle_ckpt", "checkpoint"),
        ("swap_files", "middle", "chain broken between files"),
    ],
)
async def test_tampering_across_files_is_detected(
    tmp_path: Path, ring: Keyring, mutate: str, expect_file: str, why: str
) -> None:
    paths = await write_rotated(tmp_path, ring)
    assert len(paths) >= 5
    mid = len(paths) // 2
    middle, tail_file = paths[mid], paths[-1]
    lines = middle.read_bytes().splitlines(keepends=True)
    if mutate == "edit":
        middle.write_bytes(b"".join([lines[0].replace(b"suppress", b"allow"), *lines[1:]]))
    elif mutate == "delete_line":
        middle.write_bytes(b"".join(lines[:1] + lines[2:]))
    elif mutate == "swap_lines":
        middle.write_bytes(b"".join([lines[1], lines[0], *lines[2:]]))
    elif mutate == "drop_middle":
        middle.unlink()
    elif mutate == "drop_tail":
        tail_file.unlink()
    elif mutate == "empty_tail":
        tail_file.write_bytes(b"")
    elif mutate == "drop_head":
        paths[0].unlink()
        files.ckpt_path(paths[0]).unlink()
    elif mutate == "forge_checkpoint":
        ckpt = files.ckpt_path(middle)
        ckpt.write_bytes(ckpt.read_bytes().replace(b'"next":"', b'"next":"x'))
    elif mutate == "swap_files":
        a, b = middle.read_bytes(), paths[mid + 1].read_bytes()
        middle.write_bytes(b)
        paths[mid + 1].write_bytes(a)
    result = verify_path(tmp_path, ring)
    assert not result.ok
    expected = {
        "middle": middle,
        "after_middle": paths[mid + 1],
        "tail": tail_file,
        "second": paths[1],
        "middle_ckpt": files.ckpt_path(middle),
    }[expect_file]
    assert result.file == expected, result
    assert why in result.why, result


async def test_random_mutations_of_a_rotated_log_are_all_detected(
    tmp_path: Path, ring: Keyring
) -> None:
    """The audit-tampering fuzzer over several files and their checkpoints (cutting lines off
    the end of the newest file is the one undetectable change, by construction; not generated)."""
    source = tmp_path / "source"
    source.mkdir()
    await write_rotated(source, ring, days=2, per_day=12)
    work = tmp_path / "work"
    rng = random.Random(11)
    for round_ in range(600):
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(source, work)
        logs = [p for _, _, p in files.stream_files(work, STREAM)]
        ckpts = sorted(work.glob("*.ckpt"))
        kind = rng.randrange(5)
        if kind == 0:  # flip one byte in any file or checkpoint
            target = rng.choice(logs + ckpts)
            data = bytearray(target.read_bytes())
            pos = rng.randrange(len(data))
            data[pos] = (data[pos] + rng.randrange(1, 256)) % 256
            target.write_bytes(bytes(data))
        elif kind == 1:  # delete any whole file but leave the rest
            rng.choice(logs).unlink()
        elif kind == 2:  # delete a line, not the newest file's last one
            target = rng.choice(logs)
            lines = target.read_bytes().splitlines(keepends=True)
            last = len(lines) - (1 if target == logs[-1] else 0)
            i = rng.randrange(last) if last else 0
            target.write_bytes(b"".join(lines[:i] + lines[i + 1 :]))
        elif kind == 3:  # move a line into another file
            a, b = rng.sample(logs, 2)
            la = a.read_bytes().splitlines(keepends=True)
            line = la.pop(rng.randrange(len(la)))
            a.write_bytes(b"".join(la))
            b.write_bytes(b.read_bytes() + line)
        else:  # swap two files' contents
            a, b = rng.sample(logs, 2)
            da, db = a.read_bytes(), b.read_bytes()
            a.write_bytes(db)
            b.write_bytes(da)
        assert not verify_path(work, ring).ok, (round_, kind)


async def test_writer_refuses_to_continue_after_its_next_file_vanished(
    tmp_path: Path, ring: Keyring
) -> None:
    paths = await write_rotated(tmp_path, ring, days=1, per_day=14)
    paths[-1].unlink()
    w = writer(tmp_path, ring, Clock(DAY1 + 60), max_file_bytes=SMALL)
    with pytest.raises(AuditError, match="missing"):
        await w.open()


async def test_a_checkpoint_lost_in_a_crash_is_written_again(tmp_path: Path, ring: Keyring) -> None:
    paths = await write_rotated(tmp_path, ring, days=1, per_day=14)
    closed = files.ckpt_path(paths[-2])
    original = closed.read_bytes()
    closed.unlink()  # the crash window: next file durable, its predecessor's checkpoint not
    assert verify_path(tmp_path, ring).ok  # a missing checkpoint alone is no break
    w = writer(tmp_path, ring, Clock(DAY1 + 60), max_file_bytes=SMALL)
    await w.open()
    await w.close()
    again = orjson.loads(closed.read_bytes())
    assert again["next"] == orjson.loads(original)["next"] == paths[-1].name
    paths[-1].unlink()
    assert "missing" in verify_path(tmp_path, ring).why


async def test_retention_prunes_whole_old_files_and_verify_still_passes(
    tmp_path: Path, ring: Keyring
) -> None:
    clock = Clock()
    w = writer(tmp_path, ring, clock, max_file_bytes=SMALL)
    other = writer(tmp_path, ring, clock, stream="gw1-cli")
    await w.open()
    await other.open()
    for day in range(5):
        for n in range(8):
            await w.append([decision(day * 100 + n)])
        await other.append([decision(day)])
        clock.t += 86_400
    await other.close()
    before = {p.name for p in tmp_path.glob("*.jsonl")}
    clock.t = DAY1 + 4 * 86_400 + 3600  # "today" is day 5; keep two days
    removed = await prune_directory(w, retention_days=2, keyring=ring)
    await w.close()
    assert removed and all(("2026-11-23" in n or "2026-11-24" in n) for n in removed)
    after = {p.name for p in tmp_path.glob("*.jsonl")}
    assert after == before - set(removed)
    assert not list(tmp_path.glob("*2026-11-23*")), "checkpoints go with their files"
    pruned = [e for p in sorted(tmp_path.glob("gw1-2*.jsonl")) for e in entries(p)]
    notes = [e for e in pruned if e["event"] == "audit_pruned"]
    assert notes and notes[0]["retention_days"] == 2
    result = verify_path(tmp_path, ring)
    assert result.ok, result
    # Deleting one more file at the head is not retention: caught.
    [(_, _, oldest), *_] = files.stream_files(tmp_path, STREAM)
    oldest.unlink()
    assert "stream starts at seq" in verify_path(tmp_path, ring).why


async def test_tail_and_follow(tmp_path: Path, ring: Keyring) -> None:
    clock = Clock()
    w = writer(tmp_path, ring, clock, max_file_bytes=SMALL)
    await w.open()
    for n in range(1, 13):
        await w.append([decision(n)])
        clock.t += 1
    assert [e["txn"] for e in tail.last_entries(tmp_path, 5)] == [8, 9, 10, 11, 12]
    assert [e["txn"] for e in tail.last_entries(tmp_path, 50)] == list(range(1, 13))
    follower = tail.follow(
        tmp_path, sleep=lambda _: None, keep_going=iter([True, True, False]).__next__
    )
    for n in range(13, 20):  # crosses into a new file by size
        await w.append([decision(n)])
        clock.t += 1
    await w.close()
    assert [e["txn"] for e in follower] == list(range(13, 20))
