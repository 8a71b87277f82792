"""PNG plots of a zoo run: quality vs speed per target, detection coverage per architecture.

matplotlib is optional: without it :func:`write_plots` logs why and writes nothing.
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
