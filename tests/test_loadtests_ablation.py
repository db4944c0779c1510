"""loadtests/ablated_gateway.py: every variant sms_breakdown.py asks for patches a part of
the gateway that still exists (a renamed method would otherwise leave the real code running
under the variant's name, and the breakdown would print a cost of zero for it)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "loadtests" / "ablated_gateway.py"
VARIANTS = ["full", "no-audit", "no-lookup", "no-provider", "http-only"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_variant_patches_and_hands_over_to_the_gateway_cli(variant: str) -> None:
    done = run(variant, "serve", "--help")
    assert done.returncode == 0, done.stderr
    assert "--workers" in done.stdout  # the gateway's own `serve --help`


def test_unknown_variant_and_several_workers_are_refused() -> None:
    assert "unknown variant" in run("no-such-part", "serve", "--help").stderr
    refused = run("no-audit", "serve", "--workers", "2")
    assert refused.returncode != 0 and "--workers 1" in refused.stderr


def test_the_breakdown_offers_exactly_these_variants() -> None:
    spec = importlib.util.spec_from_file_location("ablated_gateway", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines the table; patches nothing until main()
    assert list(module.VARIANTS) == VARIANTS
