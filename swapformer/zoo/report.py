"""``report.json`` and ``report.md`` from all records, and the summary printed after a run."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

import torch

from swapformer.zoo.plots import write_plots
from swapformer.zoo.records import entry_targets, identity, read_record, write_json
from swapformer.zoo.spec import Zoo


def collect(out: Path, zoo: Zoo, targets: list[str]) -> list[dict[str, Any]]:
    """Every zoo entry × target: its record, or a ``pending`` stub when it has none yet."""
    records = []
    for entry in zoo.entries:
        for target in entry_targets(entry, targets):
            rec = read_record(out, entry.name, target)
            records.append(rec or {**identity(entry), "target": target, "status": "pending"})
    return records


def write_reports(out: Path, zoo: Zoo, targets: list[str], argv: list[str]) -> dict[str, Any]:
    """Write ``report.json``, ``report.md`` and the plots; return the report."""
    records = collect(out, zoo, targets)
    report = {"meta": _meta(zoo, targets, argv), "summary": summarize(records, targets),
              "records": records}
    report["plots"] = [str(p.relative_to(out)) for p in write_plots(records, targets, out / "plots")]
    write_json(out / "report.json", report)
    (out / "report.md").write_text(format_markdown(report))
    return report


def _meta(zoo: Zoo, targets: list[str], argv: list[str]) -> dict[str, Any]:
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "zoo": str(zoo.path),
            "targets": targets, "command": shlex.join(["swapformer", "zoo", *argv]),
            "python_executable": sys.executable,
            "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs",
            "python": platform.python_version(), "torch": torch.__version__}


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
