"""The verification report: report.json for tools, report.html for a person at a glance.

The page works offline: no script, font or style from anywhere else. Per node, a timeline
from power-on: firmware, kernel, multi-user, seed applied, and each service healthy.
"""

from __future__ import annotations

import html
import json
import time
from pathlib import Path
from typing import Any

from ..fsutil import write_atomic

BOOT_PHASES = ("firmware", "kernel", "multi-user", "seed")
COLOURS = {"pass": "#d9f2d9", "fail": "#f8d0d0", "skipped": "#eeeeee"}


def timeline(boot: dict[str, dict[str, float]], records: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """node -> event -> seconds after power-on: the boot phases from the harness, the services'
    healthy times from the agents' records (wall clocks: the nodes keep time with the host's)."""
    out: dict[str, dict[str, float]] = {}
    for node, phases in boot.items():
        events = {"power-on": 0.0, **{p: phases[p] for p in BOOT_PHASES if p in phases}}
        at = phases.get("at")
        for service, status in (records.get(node, {}).get("services") or {}).items():
            if at and status.get("state") == "ok" and status.get("since"):
                events[f"{service} healthy"] = round(max(0.0, status["since"] - at), 1)
        out[node] = dict(sorted(events.items(), key=lambda kv: kv[1]))
    return out


def write(out: Path, cluster: str, results: list[dict[str, Any]], events: dict[str, dict[str, float]],
          figures: dict[str, Any]) -> tuple[Path, Path]:
    verdict = "fail" if any(r["status"] == "fail" for r in results) else "pass"
    report = {"cluster": cluster, "verdict": verdict, "at": round(time.time(), 1), "checks": results,
              "timeline": events, "figures": figures}
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "report.json", json.dumps(report, indent=2) + "\n")
    write_atomic(out / "report.html", page(report))
    return out / "report.json", out / "report.html"


STYLE = """body{font:14px system-ui,sans-serif;margin:2em;color:#222;max-width:70em}
h1 .pass{color:#1a7f1a}h1 .fail{color:#b00}table{border-collapse:collapse;width:100%}
td,th{border:1px solid #ccc;padding:.35em .6em;text-align:left;vertical-align:top}th{background:#f3f3f3}
details pre{white-space:pre-wrap;font-size:12px;background:#fafafa;padding:.5em;max-height:20em;overflow:auto}
.lane{position:relative;border-bottom:1px solid #eee;margin:0 9em 0 6em}
.lane b{position:absolute;left:-6em;top:.4em}.ev{position:absolute;border-left:2px solid #246;
padding-left:3px;font-size:11px;line-height:1.3em;white-space:nowrap}
.axis{margin:0 9em 0 6em;color:#666;font-size:11px;position:relative;height:1.4em}.axis span{position:absolute}"""
LABEL_CHAR = 0.75  # percent of a lane's width one character of an event's label takes, about
ROW = 1.3  # em, one row of labels


def label_rows(labels: list[tuple[float, int]]) -> list[int]:
    """A row for each label (its left edge in percent, its length in characters), in order of time,
    so that no two labels in one row overlap: the first row where the last label has ended."""
    ends: list[float] = []
    rows = []
    for left, chars in labels:
        row = next((i for i, end in enumerate(ends) if end <= left), len(ends))
        if row == len(ends):
            ends.append(0.0)
        ends[row] = left + chars * LABEL_CHAR
        rows.append(row)
    return rows


def page(report: dict[str, Any]) -> str:
    e = html.escape
    rows = []
    for r in report["checks"]:
        rows.append(f'<tr style="background:{COLOURS.get(r["status"], "#fff")}"><td>{e(r["status"])}</td>'
                    f'<td>{e(r["name"])}</td><td>{e(r["reason"])}<details><summary>evidence</summary>'
                    f'<pre>{e(r.get("evidence", ""))}</pre></details></td><td>{r["seconds"]:.0f}s</td></tr>')
    events = report["timeline"]
    span = max([t for ev in events.values() for t in ev.values()] + [1.0])
    lanes = []
    for node, ev in events.items():
        labels = [(k, t, f"{k} {t:.0f}s") for k, t in ev.items()]
        placed = label_rows([(100 * t / span, len(text)) for _, t, text in labels])
        marks = []
        for (k, t, text), row in zip(labels, placed, strict=True):
            marks.append(f'<span class="ev" style="left:{100 * t / span:.2f}%;top:{row * ROW:.1f}em" '
                         f'title="{e(k)} at {t:.0f}s">{e(text)}</span>')
        height = (max(placed, default=0) + 1) * ROW + 0.5
        lanes.append(f'<div class="lane" style="height:{height:.1f}em"><b>{e(node)}</b>{"".join(marks)}</div>')
    ticks = "".join(f'<span style="left:{100 * t / span:.2f}%">{t:.0f}s</span>'
                    for t in [span * i / 5 for i in range(6)])
    figures = "".join(f"<tr><th>{e(str(k))}</th><td>{e(str(v))}</td></tr>" for k, v in report["figures"].items())
    verdict = report["verdict"]
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(report["at"]))
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>clusterforge: {e(report["cluster"])}: '
            f'{verdict}</title><style>{STYLE}</style></head><body>'
            f'<h1>cluster {e(report["cluster"])}: <span class="{verdict}">{verdict}</span></h1><p>verified {when}</p>'
            f"<h2>checks</h2><table><tr><th>result</th><th>check</th><th>why</th><th>took</th></tr>{''.join(rows)}"
            f"</table><h2>timeline (seconds after power-on)</h2>{''.join(lanes)}<div class=\"axis\">{ticks}</div>"
            f"<h2>figures</h2><table>{figures}</table></body></html>\n")
