"""The overview's charts: stacked bars per day drawn on the server as SVG (pygal), each
with its numbers as a table beside it (the table is the accessible form; the chart is
named and described for screen readers: ``role="img"`` and ``aria-labelledby`` naming its
``<title>`` and ``<desc>``).

pygal's own script (tooltips) is removed: the console runs no JavaScript, and its
Content-Security-Policy would refuse it anyway.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from html import escape
from typing import Final

import pygal
from markupsafe import Markup
from pygal.style import Style

from gateway.review.index import Daily

DAYS: Final = 30
WIDTH: Final = 760
HEIGHT: Final = 300
# Dark, distinct colours: every series stands out from white at 4.5:1 or more.
COLOURS: Final = (
    "#0b4f8a", "#9b1c1c", "#7a4f00", "#14532d", "#5b2a86", "#3d3d3d", "#00606b", "#8a1c5a",
)  # fmt: skip
DECISION_ORDER: Final = ("allow", "suppress", "defer", "reject")
_SCRIPT: Final = re.compile(r"<script\b.*?</script>", re.DOTALL)
_STYLE: Final = Style(
    background="#ffffff", plot_background="#ffffff", foreground="#1b1b1b",
    foreground_strong="#1b1b1b", foreground_subtle="#595959", colors=COLOURS,
    font_family="system-ui, sans-serif", label_font_size=11, major_label_font_size=11,
    legend_font_size=12, title_font_size=14, opacity="1", opacity_hover="1",
)  # fmt: skip
Y_TICKS: Final = 5  # about this many whole-number lines up the y axis


@dataclass(frozen=True, slots=True, kw_only=True)
class Chart:
    """One chart and its table: `series` the columns, `rows` (day, values, total)."""

    key: str
    title: str
    desc: str
    svg: Markup
    series: tuple[str, ...]
    rows: tuple[tuple[str, tuple[int, ...], int], ...]
    totals: tuple[int, ...]


def _svg(key: str, title: str, desc: str, days: Sequence[str],
         series: Mapping[str, Sequence[int]]) -> Markup:  # fmt: skip
    chart = pygal.StackedBar(
        style=_STYLE, width=WIDTH, height=HEIGHT, explicit_size=False, js=[],
        disable_xml_declaration=True, show_legend=True, legend_at_bottom=True,
        x_label_rotation=0, show_minor_x_labels=False, print_values=False,
        tooltip_fancy_mode=False, no_data_text="nothing in these days", truncate_label=-1,
        truncate_legend=-1,
    )  # fmt: skip
    top = max((sum(v[i] for v in series.values()) for i in range(len(days))), default=0)
    chart.range = (0, max(top, Y_TICKS))  # counts: a small one still gets whole-number lines
    chart.max_scale = Y_TICKS + 1
    chart.x_labels = [d[5:] for d in days]  # MM-DD
    chart.x_labels_major = [d[5:] for i, d in enumerate(days) if i % 5 == 0]
    for name, values in series.items():
        chart.add(name, list(values))
    svg = _SCRIPT.sub("", chart.render(is_unicode=True))
    head = (
        f'<svg role="img" aria-labelledby="{key}-title {key}-desc" focusable="false" '
    )
    named = (
        f'<title id="{key}-title">{escape(title)}</title>'
        f'<desc id="{key}-desc">{escape(desc)}</desc>'
    )
    opening_end = svg.index(">") + 1
    svg = head + svg[len("<svg ") : opening_end] + named + svg[opening_end:]
    return Markup(svg)  # noqa: S704 - pygal's own SVG (etree-escaped) and escaped names


def stacked(key: str, title: str, what: str, days: Sequence[str],
            series: Mapping[str, Sequence[int]]) -> Chart:  # fmt: skip
    """A stacked bar chart of `series` (name -> one count per day) and its table."""
    names = tuple(series)
    totals = tuple(sum(series[n]) for n in names)
    if any(totals):
        parts = ", ".join(f"{n} {t}" for n, t in zip(names, totals, strict=True) if t)
        desc = f"{what} per day over the last {len(days)} days, stacked: {parts}."
    else:
        desc = f"No {what.lower()} in the last {len(days)} days."
    rows = tuple(
        (day, tuple(series[n][i] for n in names), sum(series[n][i] for n in names))
        for i, day in enumerate(days)
    )
    return Chart(
        key=key, title=title, desc=desc, svg=_svg(key, title, desc, days, series),
        series=names, rows=rows, totals=totals,
    )  # fmt: skip


def _ordered(found: set[str], first: Sequence[str]) -> list[str]:
    return [n for n in first if n in found] + sorted(found - set(first))


def overview(daily: Daily) -> list[Chart]:
    """Decisions by kind, decisions by category, and opt-outs by source, per day."""
    days = daily.days
    kinds: dict[str, list[int]] = {}
    cats: dict[str, list[int]] = {}
    sources: dict[str, list[int]] = {}
    seen_kinds = {k for d in daily.decisions.values() for k, _ in d}
    seen_cats = {c or "(none)" for d in daily.decisions.values() for _, c in d}
    seen_sources = {s or "(none)" for d in daily.optouts.values() for s in d}
    for name in _ordered(seen_kinds, DECISION_ORDER):
        kinds[name] = [0] * len(days)
    for name in sorted(seen_cats):
        cats[name] = [0] * len(days)
    for name in sorted(seen_sources):
        sources[name] = [0] * len(days)
    for i, day in enumerate(days):
        for (kind, cat), n in daily.decisions.get(day, {}).items():
            kinds[kind][i] += n
            cats[cat or "(none)"][i] += n
        for source, n in daily.optouts.get(day, {}).items():
            sources[source or "(none)"][i] += n
    return [
        stacked("decisions", "Decisions per day, by kind", "Decisions", days, kinds),
        stacked("categories", "Decisions per day, by category", "Decisions", days, cats),
        stacked("optouts", "Opt-outs per day, by source", "Opt-outs", days, sources),
    ]
