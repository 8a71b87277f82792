"""The worker process: build one model, then rewrite, verify, calibrate, save and measure each
pending target."""

from __future__ import annotations

import gc
import json
import logging
import time
import traceback
from pathlib import Path
from typing import Any

import torch

import swapformer
from swapformer.rewriter.api import PLANNERS
from swapformer.zoo.build import Built, build_model, plan_data
from swapformer.zoo.calibration import calibrate_step
from swapformer.zoo.invariants import verify_step
from swapformer.zoo.metrics import measure_step
from swapformer.zoo.records import identity, record_all, record_path, slug, write_json
from swapformer.zoo.spec import DEFAULTS, ZooEntry

log = logging.getLogger(__name__)


def run_worker(work_path: Path) -> int:
    """Body of a worker process: build the model once, then run every pending target."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    work = json.loads(work_path.read_text())
    torch.set_num_threads(int(work["threads"]))
    entry, out = ZooEntry(**work["entry"]), Path(work["out"])
    t0 = time.perf_counter()
    try:
        built = build_model(entry)
    except Exception as e:  # noqa: BLE001 - a model that does not build is a recorded result
        record_all(out, entry, work["targets"], "failed", f"load: {type(e).__name__}: {e}",
                   {"error": _error(e)})
        return 0
    load_s = time.perf_counter() - t0
    for target in work["targets"]:
        record = run_target(entry, built, target, work)
        record["seconds"]["load"] = load_s
        write_json(record_path(out, entry.name, target), record)
        log.info("%s × %s: %s", entry.name, target, record["status"])
        gc.collect()
    return 0


def run_target(entry: ZooEntry, built: Built, target: str, work: dict[str, Any]) -> dict[str, Any]:
    """Rewrite, verify, calibrate, save and measure one model × target; never raises."""
    rec: dict[str, Any] = {**identity(entry), "target": target, "status": "ok", "seconds": {}}
    rec["source"].update(built.info)
    settings, options = entry.settings, work["target_options"].get(target, {})
    kinds = tuple(settings.get("kinds", DEFAULTS["kinds"]))
    t0 = time.perf_counter()
    try:
        planned = {"calibration_data": plan_data(built, settings)} if target in PLANNERS else {}
        student = swapformer.rewrite(built.model, target, example_inputs=built.inputs, kinds=kinds,
                                     **options, **planned)
    except Exception as e:  # noqa: BLE001 - the failure is the result
        rec.update(status="failed", reason=f"rewrite: {type(e).__name__}: {e}", error=_error(e))
        rec["detection"] = _detection_only(built, kinds, settings)
        if isinstance(e, swapformer.VerificationError):
            rec["verify"] = {"exact": False, "passed": False}
        return rec
    rec["seconds"]["rewrite"] = time.perf_counter() - t0
    report = student.swapformer_report
    rec["detection"] = describe_detection(report.sites, report.capture, settings)
    rec["rewrite"] = {"replaced": len(report.replaced), "options": options, "capture": report.capture,
                      "skipped": [{"site": s.site.name, "reason": s.reason} for s in report.skipped]}
    if report.plan is not None:
        rec["rewrite"]["plan"] = {"summary": report.plan.summary,
                                  "choices": {c.site: c.label for c in report.plan.choices}}
    if not report.replaced:
        rec.update(status="no-sites", reason=_no_site_reason(report))
    steps = (("verify", verify_step), ("calibrate", calibrate_step), ("save", save_step), ("measure", measure_step))
    for step, fn in steps:
        if not report.replaced and step in ("calibrate", "save"):
            continue
        t1 = time.perf_counter()
        try:
            student = fn(rec, built, student, target, work) or student
        except Exception as e:  # noqa: BLE001 - recorded; the next steps still run
            rec[step] = {**rec.get(step, {}), "error": _error(e)}
            if step != "measure":
                rec.update(status="failed", reason=f"{step}: {type(e).__name__}: {e}")
        rec["seconds"][step] = time.perf_counter() - t1
    rec["seconds"]["total"] = time.perf_counter() - t0
    return rec


def _error(e: BaseException) -> dict[str, str]:
    tb = traceback.format_exception(e)
    return {"type": type(e).__name__, "message": str(e)[:2000], "traceback": "".join(tb[-6:])[-4000:]}


def _no_site_reason(report: Any) -> str:
    if not report.sites:
        return "no sites detected"
    reasons = sorted({s.reason for s in report.skipped})
    return "every site skipped: " + "; ".join(reasons)


def _detection_only(built: Built, kinds: tuple[str, ...], settings: dict[str, Any]) -> dict[str, Any]:
    """Detection when the rewrite failed: what ``find_sites`` sees, or the error."""
    try:
        sites = swapformer.find_sites(built.model, built.inputs, kinds=kinds)
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {e}"[:500], "sites": 0}
    return describe_detection(sites, None, settings)


def describe_detection(sites: list[Any], capture: str | None, settings: dict[str, Any]) -> dict[str, Any]:
    """Site counts by kind and form, the capture strategy, and the expected count if known."""
    forms: dict[str, int] = {}
    for s in sites:
        key = f"{s.kind}:{getattr(s, 'form', '') or '?'}"
        forms[key] = forms.get(key, 0) + 1
    attention = [s for s in sites if s.kind == "attention"]
    return {"capture": capture, "sites": len(sites), "attention": len(attention),
            "ffn": len(sites) - len(attention), "forms": forms,
            "causal": sum(bool(getattr(s, "causal", False)) for s in attention),
            "expected": settings.get("expected_sites"), "site_names": [s.name for s in sites]}


def save_step(rec: dict[str, Any], built: Built, student: Any, target: str, work: dict[str, Any]) -> None:
    """The save step of :func:`run_target`: :func:`swapformer.save` under ``DIR/models/``."""
    entry = ZooEntry(**work["entry"])
    path = Path(work["out"]) / "models" / slug(entry.name) / target
    kinds = tuple(entry.settings.get("kinds", DEFAULTS["kinds"]))
    meta = {"zoo_entry": entry.name, "model_spec": entry.model, "hf_config": entry.hf_config}
    swapformer.save(student, path, base_model=built.model, example_inputs=built.inputs, kinds=kinds,
                    metadata=json.loads(json.dumps(meta, default=str)))
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    rec["save"] = {"path": str(path.relative_to(work["out"])), "bytes": size}
