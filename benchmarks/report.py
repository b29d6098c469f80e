"""The latency benchmark's report: one self-contained HTML file with hand-built SVG charts.

No JavaScript and nothing fetched: the file opens anywhere, offline, and can be attached to an
issue as it is. Charts: caller voice-to-voice CDF per run, the waterfall of the server's p50
stage times, and p50/p90 against the number of concurrent callers.
"""

from __future__ import annotations

import html
import itertools
import json
from pathlib import Path

from agent.metrics import STAGES

W, H, PAD = 640, 320, 48  # chart size and the margin left for axes
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
TARGET_MS = 1200  # the p90 bound under load


class Chart:
    """An SVG plot area mapping data coordinates to pixels, with axes and a legend."""

    def __init__(self, title: str, x_max: float, y_max: float, x_label: str, y_label: str | None) -> None:
        self.x_max, self.y_max = x_max or 1.0, y_max or 1.0
        self.parts = [f'<text x="{W / 2}" y="18" text-anchor="middle" font-weight="bold">{html.escape(title)}</text>']
        self.parts += self._axes(x_label, y_label)  # y_label None: rows, not a y scale (the waterfall)
        self.legend_rows = 0

    def x(self, v: float) -> float:
        return PAD + v / self.x_max * (W - 2 * PAD)

    def y(self, v: float) -> float:
        return H - PAD - v / self.y_max * (H - 2 * PAD)

    def _axes(self, x_label: str, y_label: str | None) -> list[str]:
        out = [f'<line x1="{PAD}" y1="{H - PAD}" x2="{W - PAD}" y2="{H - PAD}" stroke="#333"/>', f'<line x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{H - PAD}" stroke="#333"/>']
        for i in range(5):
            xv, yv = self.x_max * i / 4, self.y_max * i / 4
            out.append(f'<text x="{self.x(xv):.1f}" y="{H - PAD + 16}" text-anchor="middle">{_num(xv)}</text>')
            if y_label is not None:
                out.append(f'<text x="{PAD - 6}" y="{self.y(yv) + 4:.1f}" text-anchor="end">{_num(yv)}</text>')
                out.append(f'<line x1="{PAD}" y1="{self.y(yv):.1f}" x2="{W - PAD}" y2="{self.y(yv):.1f}" stroke="#eee"/>')
        out.append(f'<text x="{W / 2}" y="{H - 8}" text-anchor="middle">{html.escape(x_label)}</text>')
        out.append(f'<text x="14" y="{H / 2}" text-anchor="middle" transform="rotate(-90 14 {H / 2})">{html.escape(y_label or "")}</text>')
        return out

    def line(self, points: list[tuple[float, float]], color: str, label: str | None = None, dashed: bool = False, step: bool = False) -> None:
        if step:  # a CDF: horizontal, then up
            points = [p for (x0, y0), (x1, _) in itertools.pairwise(points + points[-1:]) for p in ((x0, y0), (x1, y0))]
        path = " ".join(f"{self.x(x):.1f},{self.y(y):.1f}" for x, y in points)
        dash = ' stroke-dasharray="5,4"' if dashed else ""
        self.parts.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"{dash}/>')
        for x, y in points if not step else []:
            self.parts.append(f'<circle cx="{self.x(x):.1f}" cy="{self.y(y):.1f}" r="3" fill="{color}"/>')
        if label:
            self.legend(label, color)

    def bar(self, x0: float, x1: float, row: int, rows: int, color: str, label: str) -> None:
        """A horizontal bar from x0 to x1 in row `row` of `rows` (a waterfall step), labelled on its left."""
        height = (H - 2 * PAD) / rows
        top = PAD + row * height
        self.parts.append(f'<rect x="{self.x(x0):.1f}" y="{top + 2:.1f}" width="{max(1.0, self.x(x1) - self.x(x0)):.1f}" height="{height - 4:.1f}" fill="{color}"/>')
        self.parts.append(f'<text x="{self.x(x1) + 4:.1f}" y="{top + height / 2 + 4:.1f}" font-size="10">{html.escape(label)}</text>')

    def legend(self, label: str, color: str) -> None:
        y = PAD + 14 * self.legend_rows
        self.parts.append(f'<rect x="{W - PAD - 150}" y="{y - 9}" width="10" height="10" fill="{color}"/><text x="{W - PAD - 136}" y="{y}">{html.escape(label)}</text>')
        self.legend_rows += 1

    def svg(self) -> str:
        return f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">{"".join(self.parts)}</svg>'


def _num(v: float) -> str:
    return f"{v:.0f}" if v >= 10 or v == 0 else f"{v:.2g}"


def _run_label(run: dict) -> str:
    return f"{run['config']} K={run['callers']}"


def _v2v(run: dict) -> list[float]:
    return sorted(r["caller_v2v_ms"] for r in run["results"] if r["caller_v2v_ms"] is not None)


def cdf_chart(runs: list[dict]) -> str:
    """Caller voice-to-voice CDF, one line per (config, K)."""
    values = [_v2v(r) for r in runs]
    chart = Chart("caller voice-to-voice: CDF", max((v[-1] for v in values if v), default=1.0) * 1.05, 1.0, "ms after the true end of speech", "fraction of turns")
    for (run, v), color in zip(zip(runs, values), itertools.cycle(COLORS)):
        if v:
            chart.line([(0.0, 0.0)] + [(x, (i + 1) / len(v)) for i, x in enumerate(v)], color, _run_label(run), step=True)
    return chart.svg()


def waterfall_chart(runs: list[dict]) -> str:
    """The server's p50 stage times (ms after its VAD saw speech end) at each config's lowest K: each bar spans from the stage before."""
    staged = [min((r for r in runs if r["config"] == c and r.get("server_stages_p50_ms")), key=lambda r: r["callers"], default=None) for c in dict.fromkeys(r["config"] for r in runs)]
    staged = [r for r in staged if r is not None]
    per = len(STAGES) - 1
    top = max((v or 0 for r in staged for v in r["server_stages_p50_ms"].values()), default=1.0)
    chart = Chart("server stages, p50 (waterfall)", top * 1.3, 1.0, "ms after speech end (server VAD)", None)
    for i, (run, color) in enumerate(zip(staged, itertools.cycle(COLORS))):
        p50 = run["server_stages_p50_ms"]
        for j, (before, stage) in enumerate(itertools.pairwise(STAGES)):
            start, end = p50.get(before) or 0.0, p50.get(stage)
            if end is not None:  # a speculative turn may reach a stage before the one listed ahead of it
                chart.bar(min(start, end), max(start, end), i * per + j, len(staged) * per, color, f"{_run_label(run)}: {stage} {end:.0f}")
    if not staged:
        chart.parts.append(f'<text x="{W / 2}" y="{H / 2}" text-anchor="middle">no server timelines (the Twilio protocol carries none)</text>')
    return chart.svg()


def concurrency_chart(runs: list[dict]) -> str:
    """p50 and p90 caller voice-to-voice against K, per config, with the 1.2 s target."""
    configs = list(dict.fromkeys(r["config"] for r in runs))
    ks = [r["callers"] for r in runs]
    top = max([TARGET_MS] + [r["caller_v2v_ms"]["p90"] or 0 for r in runs]) * 1.1
    chart = Chart("caller voice-to-voice vs concurrency", max(ks) + 1, top, "concurrent callers (K)", "ms")
    chart.line([(0.0, TARGET_MS), (max(ks) + 1, TARGET_MS)], "#999", f"target p90 {TARGET_MS} ms", dashed=True)
    for config, color in zip(configs, COLORS):
        mine = sorted((r for r in runs if r["config"] == config), key=lambda r: r["callers"])
        for q, dashed in (("p50", False), ("p90", True)):
            pts = [(r["callers"], r["caller_v2v_ms"][q]) for r in mine if r["caller_v2v_ms"][q] is not None]
            if pts:
                chart.line(pts, color, f"{config} {q}", dashed=dashed)
    return chart.svg()


def _table(runs: list[dict]) -> str:
    cols = ("config", "callers", "turns", "failed")
    head = "".join(f"<th>{c}</th>" for c in cols + ("caller p50", "p90", "p99", "server p50", "premature", "WER", "CPU"))
    rows = []
    for r in runs:
        c, s = r["caller_v2v_ms"], r["server_v2v_ms"]
        cells = [r[k] for k in cols] + [c["p50"], c["p90"], c.get("p99", "—"), s["p50"], r["premature_endpoint_rate"], r["asr_wer"], r["cpu_util"]]
        rows.append("<tr>" + "".join(f"<td>{html.escape(str('—' if v is None else v))}</td>" for v in cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def render(report: dict) -> str:
    """The whole report as one HTML document."""
    runs = report["runs"]
    facts = {k: v for k, v in report.items() if k != "runs"}
    charts = "".join(f"<figure>{svg}</figure>" for svg in (cdf_chart(runs), waterfall_chart(runs), concurrency_chart(runs))) if runs else "<p>no runs finished</p>"
    return (
        '<!DOCTYPE html><html><head><meta charset="utf-8"><title>voice-agent latency benchmark</title>'
        "<style>body{font-family:sans-serif;max-width:1000px;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}figure{margin:1em 0}pre{background:#f6f6f6;padding:8px}</style></head><body>"
        "<h1>Voice-to-voice latency</h1>"
        "<p>caller voice-to-voice = first audible reply audio (&gt; −40 dBFS) at the caller − the true end of speech in the audio it sent; "
        "server voice-to-voice = first reply audio sent − speech end seen by the server's VAD.</p>"
        f"{_table(runs)}{charts}<h2>Run</h2><pre>{html.escape(json.dumps(facts, indent=2))}</pre></body></html>\n"
    )


def write(report: dict, path: Path) -> None:
    path.write_text(render(report), encoding="utf-8")
