"""The latency benchmark's report: one self-contained HTML file with its charts drawn by matplotlib.

No JavaScript and nothing fetched: each chart is an SVG written into the page, so the file opens
anywhere, offline, and can be attached to an issue as it is. Charts: caller voice-to-voice CDF per
run, the waterfall of the server's p50 stage times, and p50/p90 against the number of concurrent
callers.
"""

from __future__ import annotations

import html
import io
import itertools
import json
from pathlib import Path

from matplotlib import rc_context
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from agent.metrics import STAGES

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
TARGET_MS = 1200  # the p90 bound under load
# Text stays text (the page's sans-serif), not glyph outlines: smaller, and searchable in the page.
SVG_STYLE = {"svg.fonttype": "none", "font.family": "sans-serif", "font.size": 9}


def _chart(title: str, x_label: str, y_label: str | None) -> tuple[Figure, Axes]:
    """A figure the size of the page's column. A Figure, not pyplot: no global state, no GUI backend."""
    fig = Figure(figsize=(6.4, 3.2), layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title, fontweight="bold")
    ax.set_xlabel(x_label)
    if y_label is None:  # rows, not a y scale (the waterfall)
        ax.set_yticks([])
    else:
        ax.set_ylabel(y_label)
        ax.grid(axis="y", color="#eee")
    return fig, ax


def _svg(fig: Figure) -> str:
    """The figure as an <svg> element for the page: without the XML prolog and matplotlib's metadata."""
    for ax in fig.axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best")
    out = io.StringIO()
    fig.savefig(out, format="svg", metadata={"Creator": None, "Date": None, "Format": None, "Type": None})
    text = out.getvalue()
    return text[text.index("<svg"):]


def _run_label(run: dict) -> str:
    return f"{run['config']} K={run['callers']}"


def _v2v(run: dict) -> list[float]:
    return sorted(r["caller_v2v_ms"] for r in run["results"] if r["caller_v2v_ms"] is not None)


def cdf_chart(runs: list[dict]) -> str:
    """Caller voice-to-voice CDF, one line per (config, K)."""
    fig, ax = _chart("caller voice-to-voice: CDF", "ms after the true end of speech", "fraction of turns")
    values = [_v2v(r) for r in runs]
    for (run, v), color in zip(zip(runs, values), itertools.cycle(COLORS)):
        if v:
            ax.step([0.0, *v], [0.0, *((i + 1) / len(v) for i in range(len(v)))], where="post", color=color, linewidth=2, label=_run_label(run))
    ax.set_xlim(0, max((v[-1] for v in values if v), default=1.0) * 1.05)
    ax.set_ylim(0, 1)
    return _svg(fig)


def waterfall_chart(runs: list[dict]) -> str:
    """The server's p50 stage times (ms after its VAD saw speech end) at each config's lowest K: each bar spans from the stage before."""
    staged = [min((r for r in runs if r["config"] == c and r.get("server_stages_p50_ms")), key=lambda r: r["callers"], default=None) for c in dict.fromkeys(r["config"] for r in runs)]
    staged = [r for r in staged if r is not None]
    per = len(STAGES) - 1
    fig, ax = _chart("server stages, p50 (waterfall)", "ms after speech end (server VAD)", None)
    top = max((v or 0 for r in staged for v in r["server_stages_p50_ms"].values()), default=1.0)
    for i, (run, color) in enumerate(zip(staged, itertools.cycle(COLORS))):
        p50 = run["server_stages_p50_ms"]
        for j, (before, stage) in enumerate(itertools.pairwise(STAGES)):
            start, end = p50.get(before) or 0.0, p50.get(stage)
            if end is not None:  # a speculative turn may reach a stage before the one listed ahead of it
                row = i * per + j
                ax.barh(row, abs(end - start), left=min(start, end), height=0.8, color=color)
                ax.text(max(start, end) + top * 0.01, row, f"{_run_label(run)}: {stage} {end:.0f}", va="center", fontsize=7)
    if not staged:
        ax.text(0.5, 0.5, "no server timelines (the Twilio protocol carries none)", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlim(0, (top or 1.0) * 1.3)  # room for the labels right of the bars
    ax.set_ylim(max(len(staged) * per, 1) - 0.5, -0.5)  # the first stage on top
    return _svg(fig)


def concurrency_chart(runs: list[dict]) -> str:
    """p50 and p90 caller voice-to-voice against K, per config, with the issue's p90 target."""
    configs = list(dict.fromkeys(r["config"] for r in runs))
    ks = [r["callers"] for r in runs]
    fig, ax = _chart("caller voice-to-voice vs concurrency", "concurrent callers (K)", "ms")
    ax.axhline(TARGET_MS, color="#999", linestyle="--", label=f"target p90 {TARGET_MS} ms")
    for config, color in zip(configs, COLORS):
        mine = sorted((r for r in runs if r["config"] == config), key=lambda r: r["callers"])
        for q, style in (("p50", "-"), ("p90", "--")):
            pts = [(r["callers"], r["caller_v2v_ms"][q]) for r in mine if r["caller_v2v_ms"][q] is not None]
            if pts:
                ax.plot(*zip(*pts), style, marker="o", color=color, linewidth=2, label=f"{config} {q}")
    ax.set_xlim(0, max(ks) + 1)
    ax.set_ylim(0, max([TARGET_MS] + [r["caller_v2v_ms"]["p90"] or 0 for r in runs]) * 1.1)
    ax.xaxis.get_major_locator().set_params(integer=True)
    return _svg(fig)


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
    with rc_context(SVG_STYLE):
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
