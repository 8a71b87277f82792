"""The reports of a zoo run (``swapformer zoo``): summary, markdown and text tables, PNG plots.

Plots: quality vs speed per target, detection coverage per architecture. matplotlib is optional:
without it :func:`write_plots` logs why and writes nothing.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def write_plots(records: list[dict[str, Any]], targets: list[str], out: Path) -> list[Path]:
    """Write ``quality_vs_speed_<target>.png`` per target and ``detection_coverage.png``.

    Args:
        records: the zoo records (one per model × target).
        targets: the targets of the run, in order.
        out: the plot folder (created).

    Returns:
        The files written (none when matplotlib is missing or nothing was measured).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("no plots: matplotlib is not installed (pip install matplotlib)")
        return []
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for target in targets:
        rows = [r for r in records if r["target"] == target]
        path = _quality_vs_speed(plt, rows, target, out / f"quality_vs_speed_{target}.png")
        written += [path] if path else []
    path = _coverage(plt, records, out / "detection_coverage.png")
    written += [path] if path else []
    return written


def quality_point(record: dict[str, Any]) -> tuple[float, float, str] | None:
    """``(prefill speed ratio, quality value, quality label)`` of a record, or ``None``.

    Quality is the perplexity ratio (converted / original) when measured, else the relative output
    error of the verify step. Only converted models (status ``ok``) have a point.
    """
    speed = (record.get("speed") or {}).get("prefill", {}).get("speedup")
    if speed is None or record.get("status") != "ok":
        return None
    ppl = (record.get("perplexity") or {}).get("ratio")
    if ppl is not None:
        return speed, ppl, "perplexity ratio"
    err = (record.get("verify") or {}).get("output_rel_err")
    return (speed, err, "relative output error") if err is not None else None


def _quality_vs_speed(plt: Any, rows: list[dict[str, Any]], target: str, path: Path) -> Path | None:
    points = [(r["model"], quality_point(r)) for r in rows]
    points = [(name, p) for name, p in points if p is not None]
    if not points:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, label in zip(axes, ("perplexity ratio", "relative output error")):
        mine = [(n, p) for n, p in points if p[2] == label]
        ax.set_title(f"{target}: {label} vs prefill speed-up")
        ax.set_xlabel("prefill speed-up (converted / original tokens/s)")
        ax.set_ylabel(label)
        ax.axvline(1.0, color="grey", lw=0.8, ls="--")
        if not mine:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
            continue
        ax.scatter([p[0] for _, p in mine], [max(p[1], 1e-12) for _, p in mine])
        for name, p in mine:
            ax.annotate(name, (p[0], max(p[1], 1e-12)), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if label == "relative output error":
            ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def coverage_rows(records: list[dict[str, Any]]) -> list[tuple[str, int, int, int | None]]:
    """``(model, attention sites, ffn sites, expected)`` per model, from its first detection."""
    rows, seen = [], set()
    for r in records:
        det = r.get("detection")
        if not det or r["model"] in seen:
            continue
        seen.add(r["model"])
        rows.append((r["model"], det.get("attention", 0), det.get("ffn", 0), det.get("expected")))
    return rows


def _coverage(plt: Any, records: list[dict[str, Any]], path: Path) -> Path | None:
    rows = coverage_rows(records)
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.5))
    y = list(range(len(rows)))
    attn = [r[1] for r in rows]
    ax.barh(y, attn, label="attention sites found")
    ax.barh(y, [r[2] for r in rows], left=attn, label="ffn sites found")
    expected = [(i, r[3]) for i, r in zip(y, rows) if r[3] is not None]
    if expected:
        ax.scatter([e[1] for e in expected], [e[0] for e in expected], marker="|", s=200, color="black",
                   label="attention sites expected", zorder=3)
    ax.set_yticks(y, [r[0] for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("sites")
    ax.set_title("detection coverage per architecture")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# tables


def summarize(records: list[dict[str, Any]], targets: list[str]) -> dict[str, Any]:
    """Per target: counts by status, sites found/replaced, and exact rewrites."""
    summary = {}
    for target in targets:
        rows = [r for r in records if r["target"] == target]
        statuses: dict[str, int] = {}
        for r in rows:
            statuses[r["status"]] = statuses.get(r["status"], 0) + 1
        summary[target] = {
            "models": len(rows), "status": statuses,
            "sites": sum(r.get("detection", {}).get("sites", 0) for r in rows),
            "replaced": sum(r.get("rewrite", {}).get("replaced", 0) for r in rows),
            "exact": sum(bool(r.get("verify", {}).get("exact")) for r in rows),
            "verified": sum(bool(r.get("verify", {}).get("passed")) for r in rows),
        }
    return summary


def _fmt(value: Any, spec: str = ".3g") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def _ratio(r: dict[str, Any], *keys: str) -> Any:
    node: Any = r
    for k in keys:
        node = node.get(k) if isinstance(node, dict) else None
    return node


def _check_cell(r: dict[str, Any]) -> str:
    v = r.get("verify") or {}
    if v.get("exact") is not None:
        return f"exact ({_fmt(v.get('max_abs_diff'), '.1e')})" if v["exact"] else "NOT exact"
    flags = [f"{k}={'ok' if v[k] else 'FAIL'}" for k in ("finite", "causal", "batch_independent")
             if v.get(k) is not None]
    return ", ".join(flags) or "-"


def _target_rows(records: list[dict[str, Any]]) -> list[str]:
    lines = ["| model | architecture | status | sites | replaced | check | rel. err | params × | "
             "FLOPs/token × | prefill speed-up | decode speed-up | ppl orig → conv | note |",
             "|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|---|---|"]
    for r in records:
        ppl = r.get("perplexity") or {}
        ppl_cell = f"{_fmt(ppl.get('original'))} → {_fmt(ppl.get('converted'))}" if "original" in ppl else "-"
        note = (r.get("reason") or "").splitlines()[0][:90] if r.get("reason") else ""
        lines.append("| " + " | ".join([
            r["model"], _fmt(_ratio(r, "source", "architecture")), r["status"],
            _fmt(_ratio(r, "detection", "sites")), _fmt(_ratio(r, "rewrite", "replaced")), _check_cell(r),
            _fmt(_ratio(r, "verify", "output_rel_err"), ".2e"), _fmt(_ratio(r, "params", "ratio")),
            _fmt(_ratio(r, "flops_per_token", "ratio")), _fmt(_ratio(r, "speed", "prefill", "speedup")),
            _fmt(_ratio(r, "speed", "decode", "speedup")), ppl_cell, note.replace("|", "/"),
        ]) + " |")
    return lines


def _coverage_rows(records: list[dict[str, Any]]) -> list[str]:
    lines = ["| model | architecture | capture | attention sites | ffn sites | expected | forms |",
             "|---|---|---|---:|---:|---:|---|"]
    seen = set()
    for r in records:
        det = r.get("detection")
        if not det or r["model"] in seen:
            continue
        seen.add(r["model"])
        forms = ", ".join(f"{k}×{v}" for k, v in sorted(det.get("forms", {}).items()))
        lines.append(f"| {r['model']} | {_fmt(_ratio(r, 'source', 'architecture'))} | {det.get('capture')} | "
                     f"{det.get('attention')} | {det.get('ffn')} | {_fmt(det.get('expected'))} | {forms} |")
    return lines


def format_markdown(report: dict[str, Any]) -> str:
    """``report.md``: run facts, per-target summary and tables, detection coverage, plots."""
    meta, records = report["meta"], report["records"]
    out = [f"# swapformer zoo: {meta['zoo']}", "",
           f"{meta['date']} · {meta['machine']} · Python {meta['python']} · torch {meta['torch']}", "",
           f"`{meta['command']}`", "", "## Summary", "",
           "| target | models | status | sites | replaced | exact | verified |", "|---|---:|---|---:|---:|---:|---:|"]
    for target, s in report["summary"].items():
        status = ", ".join(f"{k} {v}" for k, v in sorted(s["status"].items()))
        out.append(f"| {target} | {s['models']} | {status} | {s['sites']} | {s['replaced']} | "
                   f"{s['exact']} | {s['verified']} |")
    for target in meta["targets"]:
        out += ["", f"## {target}", "", *_target_rows([r for r in records if r["target"] == target])]
    out += ["", "## Detection coverage", "", *_coverage_rows(records)]
    out += ["", "× columns are converted / original; speed-ups are > 1 when the converted model is faster "
            "(timed side by side in alternating rounds; tiny models on a shared CPU give noisy timings). "
            "FLOPs/token counts the replaced cores only, at the first `flops_contexts` length. "
            "`check` is exactness for exact targets, else invariants (finite outputs, causality kept, "
            "batch rows independent); `rel. err` is ‖converted − original‖ / ‖original‖ on the example inputs."]
    if report.get("plots"):
        out += ["", "## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in report["plots"]]
    else:
        out += ["", "(no plots: matplotlib is not installed, or nothing to plot)"]
    return "\n".join(out) + "\n"


def format_summary(report: dict[str, Any]) -> str:
    """The plain-text table ``swapformer zoo`` prints at the end."""
    rows = [("model", "target", "status", "sites", "replaced", "check", "prefill speed-up", "note")]
    for r in report["records"]:
        rows.append((r["model"], r["target"], r["status"], _fmt(_ratio(r, "detection", "sites")),
                     _fmt(_ratio(r, "rewrite", "replaced")), _check_cell(r),
                     _fmt(_ratio(r, "speed", "prefill", "speedup")),
                     ((r.get("reason") or "").splitlines() or [""])[0][:60]))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
