"""Model-zoo batch runner: every model of a zoo file × every target, each model in its own process.

Usage::

    swapformer zoo ZOO.toml --target sdpa,window --out DIR [--calibrate-tokens N] [--nproc N]
                   [--jobs J] [--shard i/n] [--timeout S] [--only GLOB,...] [--retry-failed] [--dry-run]

For each model × target: build the model, capture and detect its sites, rewrite, verify, optionally
calibrate, save (:func:`swapformer.save`) and measure it next to the original. Verification is
exactness for exact targets (``"sdpa"``: the rewrite report's ``max_abs_diff``) and invariants for the
others: outputs stay finite, a model that is causal stays causal (perturbing the last token leaves
earlier outputs unchanged) and batch rows stay independent. Measurements: parameters, attention/FFN
core FLOPs per token and decoding state (where the cores report them), prefill and decode speed of
both models timed in alternating rounds (:func:`swapformer.bench.bench_speed`), and perplexity on the
Shakespeare corpus when the model has a tokenizer and logits.

Each model runs in a worker process (``python -m swapformer.zoo _worker DIR/jobs/NAME.json``) that
handles all of its pending targets: a crash, an out-of-memory kill or a ``--timeout`` (seconds per
model) is recorded for the targets it left unfinished, and the batch goes on. One JSON record per
model × target lands in ``DIR/entries/``; a rerun skips the recorded ones (``--retry-failed`` redoes
failed, crashed and timed-out ones). Every run rewrites ``DIR/report.json``, ``DIR/report.md`` and
the PNG plots in ``DIR/plots/`` (quality vs speed per target, detection coverage per architecture;
they need matplotlib) from all records; entries of other shards show as ``pending`` until they run.
``--shard i/n`` (1 ≤ i ≤ n) takes every n-th model of the expanded zoo, starting at the i-th.

Zoo file (TOML)::

    [zoo]                       # optional defaults: seq_len, batch_size, repeats, decode_tokens,
    seq_len = 32                # ppl_batches, ppl_seq_len, corpus, kinds, timeout, img_size
    [targets.window]            # options of a target, for every model
    window = 8
    [[model]]
    name = "llama-tiny"         # a random-init Hugging Face model from a config
    hf_config = { model_type = "llama", hidden_size = 64, num_hidden_layers = 2 }
    model_class = "AutoModelForCausalLM"   # optional; default: causal LM, else seq2seq, else AutoModel
    expected_sites = 2          # optional: attention sites detection should find
    [[model]]
    model = "smollm2"           # or "minilm", a HF dir, a .gguf file, module:factory, file.py:factory
    [[model]]
    model = "timm:vit_*"        # a timm name or glob (timm.list_models); random init
    img_size = 64
    exclude = ["*huge*"]
    limit = 10

Other per-model keys: ``targets`` (restrict), ``options`` (``{window = {window = 4}}``), ``kinds``,
``attn_implementation``, ``timeout``, ``seq_len``. Relative paths resolve against the zoo file.

timm entries need timm, which needs ``torch==2.14.1`` and ``torchvision==0.29.1``: in an interpreter
without timm they are recorded as skipped. Run the zoo with the timm venv to include them::

    python3 -m venv .venv-timm && .venv-timm/bin/pip install torch==2.14.1 torchvision==0.29.1 timm \\
        networkx numpy && .venv-timm/bin/pip install --no-deps -e .
    .venv-timm/bin/python -m swapformer.zoo examples/zoo.toml --target sdpa --out zoo-timm --only 'timm-*'

Calibration (``--calibrate-tokens N``: half attention transfer, half distillation with LoRA, on the
Shakespeare corpus) runs in the worker; with ``--nproc N`` (N > 1) the worker runs it data parallel
under ``torchrun --standalone --nproc_per_node=N -m swapformer.zoo _calibrate JOB.json`` (every rank
rebuilds the model and the student, gloo on CPU / nccl on CUDA) and loads the calibrated weights back
before saving and measuring.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import fnmatch
import gc
import json
import logging
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from swapformer.bench import BenchSettings, bench_perplexity, bench_speed

log = logging.getLogger(__name__)

PROG = "swapformer zoo"
FINAL = ("ok", "no-sites", "skipped")  # statuses a rerun keeps even with --retry-failed
TIMM_ENV_HINT = ("timm is not importable in this interpreter (it needs torch==2.14.1 and "
                 "torchvision==0.29.1): run the zoo with .venv-timm/bin/python -m swapformer.zoo")
DEFAULTS: dict[str, Any] = {
    "seq_len": 32, "batch_size": 1, "repeats": 3, "decode_tokens": 8, "ppl_batches": 2,
    "ppl_seq_len": 128, "corpus": "shakespeare", "kinds": ["attention"], "timeout": 900,
    "img_size": 64, "calib_seq_len": 128, "calib_batch_size": 4, "lora_rank": 8,
    "flops_contexts": [32, 4096],
}


# the zoo file


@dataclass
class ZooEntry:
    """One model of the zoo (after ``timm:`` globs are expanded).

    Attributes:
        name: unique name; names the records ``entries/<name>__<target>.json``.
        model: a ``MODEL`` spec (HF dir, ``.gguf``, ``smollm2``, ``minilm``, ``module:factory``,
            ``timm:<name>``), or ``None`` for an ``hf_config`` entry.
        hf_config: keyword arguments of ``transformers.AutoConfig.for_model``.
        settings: the other keys of the entry, over the ``[zoo]`` defaults.
        skip_reason: why the entry cannot run in this interpreter (it is recorded as skipped).
    """

    name: str
    model: str | None = None
    hf_config: dict[str, Any] | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    skip_reason: str | None = None


@dataclass
class Zoo:
    """A parsed zoo file: defaults, per-target options and the expanded entries."""

    path: Path
    defaults: dict[str, Any]
    target_options: dict[str, dict[str, Any]]
    entries: list[ZooEntry]


def read_zoo(path: str | Path) -> Zoo:
    """Parse a zoo TOML file and expand its ``timm:`` globs.

    Raises:
        ValueError: an entry names no model, two entries share a name, or a key is unknown.
    """
    path = Path(path)
    data = tomllib.loads(path.read_text())
    defaults = {**DEFAULTS, **data.get("zoo", {})}
    raw = data.get("model", [])
    entries: list[ZooEntry] = []
    for item in raw:
        entries += _expand(_entry(item, defaults, path.parent))
    names = [e.name for e in entries]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{path}: duplicate model names {dupes}")
    return Zoo(path, defaults, dict(data.get("targets", {})), entries)


def _entry(item: dict[str, Any], defaults: dict[str, Any], base: Path) -> ZooEntry:
    item = dict(item)
    name, model, hf_config = item.pop("name", None), item.pop("model", None), item.pop("hf_config", None)
    if (model is None) == (hf_config is None):
        raise ValueError(f"zoo entry {item!r} needs exactly one of 'model' or 'hf_config'")
    if model is not None:
        model = _resolve_spec(str(model), base)
    if name is None and model is None:
        raise ValueError("an hf_config entry needs a 'name'")
    return ZooEntry(str(name or default_name(model)), model, hf_config, {**defaults, **item})


def default_name(spec: str) -> str:
    """``timm-<name>`` for timm models, the factory's name, a path's stem, else the spec itself."""
    if spec.startswith("timm:"):
        return "timm-" + spec.split(":", 1)[1]
    where, sep, attr = spec.rpartition(":")
    if sep and where:
        return attr
    return Path(spec).stem or spec


def _resolve_spec(spec: str, base: Path) -> str:
    """Make a relative file, directory or ``file.py:factory`` spec absolute against the zoo file."""
    where, sep, attr = spec.rpartition(":")
    if sep and where.endswith(".py") and not Path(where).is_absolute():
        return f"{(base / where).resolve()}:{attr}"
    if not sep and not Path(spec).is_absolute() and (base / spec).exists():
        return str((base / spec).resolve())
    return spec


def _expand(entry: ZooEntry) -> list[ZooEntry]:
    """``timm:<glob>`` → one entry per matching timm model (or one skipped entry without timm)."""
    if not (entry.model or "").startswith("timm:"):
        return [entry]
    pattern = entry.model.split(":", 1)[1]
    timm = _import_timm()
    if timm is None:
        return [dataclasses.replace(entry, skip_reason=TIMM_ENV_HINT)]
    if not any(c in pattern for c in "*?["):
        return [entry]
    names = [n for n in timm.list_models(pattern)
             if not any(fnmatch.fnmatchcase(n, x) for x in entry.settings.get("exclude", []))]
    limit = entry.settings.get("limit")
    names = names[:limit] if limit else names
    return [dataclasses.replace(entry, name=f"timm-{n}", model=f"timm:{n}") for n in names]


def _import_timm() -> Any:
    try:
        import timm
    except Exception as e:  # noqa: BLE001 - timm fails to import in many ways beside a bad torch
        log.debug("timm is not importable: %s", e)
        return None
    return timm


def shard(entries: list[ZooEntry], spec: str | None) -> list[ZooEntry]:
    """The ``i/n`` shard of ``entries``: every n-th entry starting at the i-th (1-based)."""
    if not spec:
        return entries
    i, n = parse_shard(spec)
    return entries[i - 1 :: n]


def parse_shard(spec: str) -> tuple[int, int]:
    """``"i/n"`` → ``(i, n)``.

    Raises:
        argparse.ArgumentTypeError: not of the form ``i/n`` with ``1 <= i <= n``.
    """
    m = re.fullmatch(r"(\d+)/(\d+)", spec.strip())
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        raise argparse.ArgumentTypeError(f"--shard must be i/n with 1 <= i <= n, got {spec!r}")
    return int(m.group(1)), int(m.group(2))


# records on disk


def record_path(out: Path, name: str, target: str) -> Path:
    return out / "entries" / f"{_slug(name)}__{target}.json"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def read_record(out: Path, name: str, target: str) -> dict[str, Any] | None:
    path = record_path(out, name, target)
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def pending_targets(out: Path, entry: ZooEntry, targets: list[str], retry: bool) -> list[str]:
    """The targets of ``entry`` that have no record yet (or a failed one, with ``retry``)."""
    todo = []
    for target in entry_targets(entry, targets):
        rec = read_record(out, entry.name, target)
        status = rec and rec.get("status")
        # an entry skipped for want of timm runs once an interpreter with timm comes along
        runnable_now = status == "skipped" and not entry.skip_reason
        if rec is None or runnable_now or (retry and status not in FINAL):
            todo.append(target)
    return todo


def entry_targets(entry: ZooEntry, targets: list[str]) -> list[str]:
    only = entry.settings.get("targets")
    return [t for t in targets if not only or t in only]


# the parent: plan, run workers, report


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``swapformer zoo``."""
    first, _usage, _synopsis, rest = __doc__.split("\n\n", 3)
    p = argparse.ArgumentParser(prog=PROG, description=f"{first}\n\n{rest}",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("zoo", metavar="ZOO.toml", help="the zoo file")
    p.add_argument("--target", "-t", default="sdpa",
                   help="targets, comma-separated, or 'all' (default: sdpa)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (resumable)")
    p.add_argument("--calibrate-tokens", type=int, default=0, metavar="N",
                   help="calibrate each non-exact rewrite on N Shakespeare tokens (default 0: off)")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="calibrate under torchrun with N processes (default 1: in the worker)")
    p.add_argument("--jobs", "-j", type=int, default=1, metavar="J", help="workers in parallel (default 1)")
    p.add_argument("--shard", type=_shard_arg, default=None, metavar="i/n", help="run the i-th of n shards")
    p.add_argument("--timeout", type=float, default=None, metavar="S",
                   help="seconds per model (default: the zoo's timeout, 900)")
    p.add_argument("--only", default=None, metavar="GLOB,...", help="only models whose name matches")
    p.add_argument("--retry-failed", action="store_true", help="redo failed, crashed and timed-out records")
    p.add_argument("--dry-run", action="store_true", help="list what would run, run nothing")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress lines on stderr")
    return p


def _shard_arg(text: str) -> str:
    parse_shard(text)
    return text


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``swapformer zoo`` (and of ``python -m swapformer.zoo``).

    Returns:
        0 when the batch ran (failures are recorded, not raised), 2 on a usage error.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_worker"]:
        return run_worker(Path(argv[1]))
    if argv[:1] == ["_calibrate"]:
        return run_calibration_rank(Path(argv[1]))
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    _setup_logging(args.quiet)
    try:
        zoo = read_zoo(args.zoo)
        targets = parse_targets(args.target)
    except (OSError, ValueError, tomllib.TOMLDecodeError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    args.argv = argv
    return run_zoo(zoo, targets, args)


def _setup_logging(quiet: bool) -> None:
    if quiet or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("zoo: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)


def parse_targets(text: str) -> list[str]:
    """``"sdpa,window"`` or ``"all"`` → target names.

    Raises:
        ValueError: an unknown target.
    """
    from swapformer.targets.base import available_targets

    known = available_targets()
    names = known if text.strip() == "all" else [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in names if t not in known]
    if bad or not names:
        raise ValueError(f"unknown target(s) {bad}; available targets: {', '.join(known)}")
    return names


def select(zoo: Zoo, args: argparse.Namespace) -> list[ZooEntry]:
    """The entries this run handles: ``--only`` filter, then ``--shard``."""
    entries = zoo.entries
    if args.only:
        globs = [g.strip() for g in args.only.split(",") if g.strip()]
        entries = [e for e in entries if any(fnmatch.fnmatchcase(e.name, g) for g in globs)]
    return shard(entries, args.shard)


def run_zoo(zoo: Zoo, targets: list[str], args: argparse.Namespace) -> int:
    """Run (or, with ``--dry-run``, list) the selected entries, then write the reports."""
    out = Path(args.out)
    entries = select(zoo, args)
    plan = [(e, pending_targets(out, e, targets, args.retry_failed)) for e in entries]
    if args.dry_run:
        for entry, todo in plan:
            state = entry.skip_reason and "skip" or (",".join(todo) if todo else "done")
            print(f"{entry.name}\t{entry.model or entry.hf_config.get('model_type')}\t{state}")
        return 0
    jobs = []
    for entry, todo in plan:
        if not todo:
            log.info("%s: done already", entry.name)
        elif entry.skip_reason:
            _record_all(out, entry, todo, "skipped", entry.skip_reason)
        else:
            jobs.append(_work_file(out, zoo, entry, todo, args))
    run_workers(jobs, max(1, args.jobs), args.timeout)
    from swapformer.zoo_plots import format_summary

    report = write_reports(out, zoo, targets, args.argv)
    print(format_summary(report))
    return 0


def _record_all(out: Path, entry: ZooEntry, targets: list[str], status: str, reason: str,
                extra: dict[str, Any] | None = None) -> None:
    for target in targets:
        write_json(record_path(out, entry.name, target),
                   {**_identity(entry), "target": target, "status": status, "reason": reason, **(extra or {})})
    log.info("%s: %s (%s)", entry.name, status, reason.splitlines()[0] if reason else "")


def _identity(entry: ZooEntry) -> dict[str, Any]:
    return {"model": entry.name, "source": {"model": entry.model, "hf_config": entry.hf_config}}


def _work_file(out: Path, zoo: Zoo, entry: ZooEntry, todo: list[str], args: argparse.Namespace) -> Path:
    """Write what the worker needs to know about ``entry`` to ``DIR/jobs/<name>.json``."""
    options = {t: {**zoo.target_options.get(t, {}), **entry.settings.get("options", {}).get(t, {})}
               for t in todo}
    threads = max(1, (os.cpu_count() or 1) // max(1, args.jobs))
    work = {"entry": dataclasses.asdict(entry), "targets": todo, "target_options": options,
            "out": str(out.resolve()), "calibrate_tokens": args.calibrate_tokens,
            "nproc": args.nproc, "threads": threads,
            "timeout": args.timeout or entry.settings.get("timeout") or DEFAULTS["timeout"]}
    path = out / "jobs" / f"{_slug(entry.name)}.json"
    write_json(path, work)
    return path


@dataclass
class _Running:
    work: Path
    proc: subprocess.Popen
    started: float
    timeout: float
    log_file: Any


def run_workers(work_files: list[Path], jobs: int, timeout: float | None) -> None:
    """Run one worker process per work file, ``jobs`` at a time; record crashes and timeouts."""
    queue, running, done = list(work_files), [], 0
    try:
        while queue or running:
            while queue and len(running) < jobs:
                running.append(_start(queue.pop(0), timeout))
            time.sleep(0.1)
            for job in list(running):
                rc = job.proc.poll()
                late = rc is None and time.monotonic() - job.started > job.timeout
                if late:
                    _kill(job.proc)
                    rc = job.proc.wait()
                if rc is not None:
                    running.remove(job)
                    job.log_file.close()
                    done += 1
                    _finish(job, rc, late, f"[{done}/{len(work_files)}]")
    finally:
        # interrupted: workers run in their own sessions and would outlive the runner
        for job in running:
            _kill(job.proc)


def _start(work: Path, timeout: float | None) -> _Running:
    data = json.loads(work.read_text())
    for target in data["targets"]:  # a retried record is replaced, by the worker or by _finish
        record_path(Path(data["out"]), data["entry"]["name"], target).unlink(missing_ok=True)
    log_path = Path(data["out"]) / "logs" / f"{work.stem}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_file = log_path.open("w")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": str(data["threads"]), "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.Popen([sys.executable, "-m", "swapformer.zoo", "_worker", str(work)],
                            stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    log.info("%s: started (%s)", data["entry"]["name"], ", ".join(data["targets"]))
    return _Running(work, proc, time.monotonic(), float(timeout or data["timeout"]), log_file)


def _kill(proc: subprocess.Popen) -> None:
    # The worker leads its own session: kill it together with any torchrun it started.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _finish(job: _Running, rc: int, timed_out: bool, counter: str) -> None:
    """Record the targets a finished worker left without a record (it crashed or timed out)."""
    data = json.loads(job.work.read_text())
    entry = ZooEntry(**data["entry"])
    out = Path(data["out"])
    missing = [t for t in data["targets"] if not record_path(out, entry.name, t).exists()]
    seconds = time.monotonic() - job.started
    if missing:
        status, reason = _death(rc, timed_out, job.timeout)
        tail = _log_tail(out / "logs" / f"{job.work.stem}.log")
        _record_all(out, entry, missing, status, reason, {"log_tail": tail, "seconds": {"total": seconds}})
    log.info("%s %s: finished in %.1f s (exit %s)", counter, entry.name, seconds, rc)


def _death(rc: int, timed_out: bool, timeout: float) -> tuple[str, str]:
    if timed_out:
        return "timeout", f"worker killed after the {timeout:.0f} s timeout"
    if rc < 0:
        name = signal.Signals(-rc).name if -rc in signal.valid_signals() else str(-rc)
        hint = " (likely out of memory)" if -rc == signal.SIGKILL else ""
        return "crashed", f"worker died from signal {name}{hint}"
    return "crashed", f"worker exited with status {rc} before recording this target"


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# reports


def collect(out: Path, zoo: Zoo, targets: list[str]) -> list[dict[str, Any]]:
    """Every zoo entry × target: its record, or a ``pending`` stub when it has none yet."""
    records = []
    for entry in zoo.entries:
        for target in entry_targets(entry, targets):
            rec = read_record(out, entry.name, target)
            records.append(rec or {**_identity(entry), "target": target, "status": "pending"})
    return records


def write_reports(out: Path, zoo: Zoo, targets: list[str], argv: list[str]) -> dict[str, Any]:
    """Write ``report.json``, ``report.md`` and the plots; return the report."""
    from swapformer import zoo_plots

    records = collect(out, zoo, targets)
    report = {"meta": _meta(zoo, targets, argv), "summary": zoo_plots.summarize(records, targets),
              "records": records}
    report["plots"] = [str(p.relative_to(out)) for p in zoo_plots.write_plots(records, targets, out / "plots")]
    write_json(out / "report.json", report)
    (out / "report.md").write_text(zoo_plots.format_markdown(report))
    return report


def _meta(zoo: Zoo, targets: list[str], argv: list[str]) -> dict[str, Any]:
    import torch

    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "zoo": str(zoo.path),
            "targets": targets, "command": shlex.join(["swapformer", "zoo", *argv]),
            "python_executable": sys.executable,
            "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs",
            "python": platform.python_version(), "torch": torch.__version__}


# the worker: one model, its pending targets


@dataclass
class Built:
    """A zoo model ready to rewrite."""

    model: Any
    inputs: Any  # example inputs; None for Hugging Face models (swapformer builds them)
    tokenizer: Any
    info: dict[str, Any]  # architecture, model_type, how it was built
    check_inputs: Any = None  # the inputs the invariant checks and timings use


def run_worker(work_path: Path) -> int:
    """Body of a worker process: build the model once, then run every pending target."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    work = json.loads(work_path.read_text())
    import torch

    torch.set_num_threads(int(work["threads"]))
    entry, out = ZooEntry(**work["entry"]), Path(work["out"])
    t0 = time.perf_counter()
    try:
        built = build_model(entry)
    except Exception as e:  # noqa: BLE001 - a model that does not build is a recorded result
        _record_all(out, entry, work["targets"], "failed", f"load: {type(e).__name__}: {e}",
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


def build_model(entry: ZooEntry) -> Built:
    """Build the model of a zoo entry (random init for ``hf_config`` and ``timm:`` entries)."""
    import torch

    from swapformer.rewriter.api import default_example_inputs
    from swapformer.rewriter.hf import is_hf_model

    torch.manual_seed(0)
    if entry.hf_config is not None:
        built = _build_hf_config(entry)
    elif entry.model.startswith("timm:"):
        built = _build_timm(entry)
    elif entry.model == "minilm":
        from swapformer.offline import load_minilm

        model, tokenizer = load_minilm()
        built = Built(model, None, tokenizer, {"kind": "minilm"})
    else:
        from swapformer.models import load_model

        loaded = load_model(entry.model)
        built = Built(loaded.model, loaded.example_inputs, loaded.tokenizer, {"kind": loaded.kind})
    model = built.model.eval()
    built.info["architecture"] = type(model).__name__
    built.info["model_type"] = getattr(getattr(model, "config", None), "model_type", None)
    if built.inputs is None and is_hf_model(model):
        built.check_inputs = default_example_inputs(model)
    else:
        built.check_inputs = built.inputs
    return built


def _build_hf_config(entry: ZooEntry) -> Built:
    import transformers

    config = transformers.AutoConfig.for_model(**entry.hf_config)
    impl = entry.settings.get("attn_implementation", "sdpa")
    names = [entry.settings["model_class"]] if "model_class" in entry.settings else \
        ["AutoModelForCausalLM", "AutoModelForSeq2SeqLM", "AutoModel"]
    for name in names:
        cls = getattr(transformers, name)
        try:
            model = (cls.from_config(config, attn_implementation=impl) if name.startswith("Auto")
                     else cls._from_config(config, attn_implementation=impl))
            break
        except ValueError:  # this auto class has no mapping for the model type: try the next
            if name == names[-1]:
                raise
    return Built(model, None, None, {"kind": "hf_config", "class": name})


def _build_timm(entry: ZooEntry) -> Built:
    import torch

    timm = _import_timm()
    if timm is None:
        raise RuntimeError(TIMM_ENV_HINT)
    name, size = entry.model.split(":", 1)[1], int(entry.settings.get("img_size", 64))
    model, size = create_timm_model(timm, name, size)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    return Built(model, (x,), None, {"kind": "timm", "img_size": size})


def create_timm_model(timm: Any, name: str, img_size: int) -> tuple[Any, int]:
    """A random-init timm model at ``img_size`` when it takes one and runs at it, else at its
    default size."""
    import torch

    kwargs = {"pretrained": False, "num_classes": 10}
    try:
        model = timm.create_model(name, img_size=img_size, **kwargs).eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, img_size, img_size))
        return model, img_size
    except Exception:  # noqa: BLE001 - not every timm model takes img_size (TypeError, asserts, ...)
        model = timm.create_model(name, **kwargs).eval()
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
    return model, int(size)


def run_target(entry: ZooEntry, built: Built, target: str, work: dict[str, Any]) -> dict[str, Any]:
    """Rewrite, verify, calibrate, save and measure one model × target; never raises."""
    import swapformer

    rec: dict[str, Any] = {**_identity(entry), "target": target, "status": "ok", "seconds": {}}
    rec["source"].update(built.info)
    settings, options = entry.settings, work["target_options"].get(target, {})
    kinds = tuple(settings.get("kinds", DEFAULTS["kinds"]))
    t0 = time.perf_counter()
    try:
        student = swapformer.rewrite(built.model, target, example_inputs=built.inputs, kinds=kinds, **options)
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
    if not report.replaced:
        rec.update(status="no-sites", reason=_no_site_reason(report))
    steps = (("verify", _verify), ("calibrate", _calibrate), ("save", _save), ("measure", _measure))
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
    import swapformer

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


# verify: exactness or invariants


def _verify(rec: dict[str, Any], built: Built, student: Any, target: str, work: dict[str, Any]) -> None:
    from swapformer.targets.base import resolve_target

    report = student.swapformer_report
    checks = check_invariants(built.model, student, built.check_inputs)
    exact = resolve_target(target).exact
    checks["max_abs_diff"] = report.max_abs_diff
    if exact and report.replaced:
        checks["exact"] = True  # rewrite() raised VerificationError otherwise
    checks["passed"] = bool(checks["finite"]) and checks.get("causal") is not False \
        and checks.get("batch_independent") is not False
    rec["verify"] = checks
    if not checks["passed"]:
        failed = [k for k in ("finite", "causal", "batch_independent") if checks.get(k) is False]
        rec.update(status="failed", reason="verify: invariant broken: " + ", ".join(failed))


def check_invariants(original: Any, student: Any, inputs: Any) -> dict[str, Any]:
    """Finite outputs, relative output error, and the causality / batch-independence invariants.

    Causality is checked only where the original model is causal on its sequence input (perturbing
    the last position leaves earlier outputs unchanged); batch independence only with batch ≥ 2.
    ``None`` means "not applicable".
    """
    import torch

    from swapformer.rewriter.capture import normalize_inputs

    args, kwargs = normalize_inputs(inputs)
    run = lambda m, a, k: _main_output(m, a, k)
    with torch.no_grad():
        ref, out = run(original, args, kwargs), run(student, args, kwargs)
        result = {"finite": bool(torch.isfinite(out).all()),
                  "output_rel_err": float((out - ref).double().norm() / ref.double().norm().clamp_min(1e-30))}
        for name, perturb, keep in (("causal", _perturb_last, lambda o: o[:, :-1]),
                                    ("batch_independent", _perturb_row, lambda o: o[:1])):
            moved = perturb(original, args, kwargs)
            if moved is None:
                result[name] = None
                continue
            same_ref = _same(keep(ref), keep(run(original, *moved)))
            result[name] = _same(keep(out), keep(run(student, *moved))) if same_ref else None
    return result


def _main_output(model: Any, args: tuple, kwargs: dict) -> Any:
    from swapformer.rewriter.verify import first_tensor

    extra = {"use_cache": False} if "input_ids" in kwargs or "decoder_input_ids" in kwargs else {}
    return first_tensor(model(*args, **kwargs, **extra)).float()


def _same(a: Any, b: Any) -> bool:
    if a.shape != b.shape or a.numel() == 0:
        return a.shape == b.shape
    scale = max(1.0, float(a.abs().max()))
    return float((a - b).abs().max()) <= 1e-5 * scale


def _sequence_slot(args: tuple, kwargs: dict) -> tuple[str | int, Any] | None:
    """Where the token/sequence input is: a kwarg name or a positional index."""
    import torch

    for key in ("decoder_input_ids", "input_ids", "inputs_embeds", "pixel_values", "x"):
        if isinstance(kwargs.get(key), torch.Tensor):
            return key, kwargs[key]
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor) and a.dim() >= 2:
            return i, a
    return None


def _replaced(args: tuple, kwargs: dict, slot: str | int, value: Any) -> tuple[tuple, dict]:
    if isinstance(slot, str):
        return args, {**kwargs, slot: value}
    return args[:slot] + (value,) + args[slot + 1 :], kwargs


def _changed(x: Any, model: Any) -> Any:
    import torch

    if x.is_floating_point():
        return x + torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=x.dtype)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or int(x.max()) + 2
    return (x + 1) % vocab


def _perturb_last(model: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    found = _sequence_slot(args, kwargs)
    if found is None or found[1].shape[1] < 2:
        return None
    slot, x = found
    y = x.clone()
    y[:, -1:] = _changed(x[:, -1:], model)
    return _replaced(args, kwargs, slot, y)


def _perturb_row(model: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    found = _sequence_slot(args, kwargs)
    if found is None or found[1].shape[0] < 2:
        return None
    slot, x = found
    y = x.clone()
    y[1:] = _changed(x[1:], model)
    return _replaced(args, kwargs, slot, y)


# calibrate


def _calibrate(rec: dict[str, Any], built: Built, student: Any, target: str, work: dict[str, Any]) -> Any:
    from swapformer.targets.base import resolve_target

    tokens = int(work.get("calibrate_tokens") or 0)
    reason = None
    if tokens <= 0:
        reason = "not requested (--calibrate-tokens 0)"
    elif resolve_target(target).exact:
        reason = "exact target: nothing to calibrate"
    elif built.tokenizer is None:
        reason = "the model has no tokenizer, so no corpus to calibrate on"
    elif not _has_logits(built.model):
        reason = "the model has no language-model head (calibration distills next-token logits)"
    if reason:
        rec["calibration"] = {"status": "skipped", "reason": reason}
        return None
    if int(work.get("nproc") or 1) > 1:
        return _calibrate_torchrun(rec, built, student, target, work)
    from swapformer.calibrate import calibrate
    from swapformer.offline import corpus_tokens

    settings = ZooEntry(**work["entry"]).settings
    data = corpus_tokens(settings.get("corpus", "shakespeare"), built.tokenizer)
    config = calibration_config(tokens, settings)
    result = calibrate(student, built.model, data, config, tokenizer=built.tokenizer)
    rec["calibration"] = calibration_summary(result)
    return result.model


def _has_logits(model: Any) -> bool:
    get = getattr(model, "get_output_embeddings", None)
    return callable(get) and get() is not None


def calibration_config(tokens: int, settings: dict[str, Any]) -> Any:
    """Half the tokens for attention transfer, half for distillation (as ``swapformer convert``)."""
    from swapformer.calibrate import CalibrationConfig, Stage

    transfer = tokens // 2
    return CalibrationConfig(stages=(Stage("transfer", tokens=transfer), Stage("distill", tokens=tokens - transfer)),
                             seq_len=int(settings.get("calib_seq_len", 128)),
                             batch_size=int(settings.get("calib_batch_size", 4)),
                             lora_rank=int(settings.get("lora_rank", 8)), progress=False)


def _calibrate_torchrun(rec: dict[str, Any], built: Built, student: Any, target: str,
                        work: dict[str, Any]) -> Any:
    """Calibrate under ``torchrun`` (data parallel, ``python -m swapformer.zoo _calibrate``) and
    load the calibrated weights into ``student``."""
    from safetensors.torch import load_file

    entry = ZooEntry(**work["entry"])
    base = Path(work["out"]) / "jobs" / f"{_slug(entry.name)}__{target}"
    job = {"entry": work["entry"], "target": target, "options": work["target_options"].get(target, {}),
           "tokens": int(work["calibrate_tokens"]), "weights": f"{base}.calib.safetensors",
           "result": f"{base}.calib.json"}
    write_json(Path(f"{base}.calib-job.json"), job)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={work['nproc']}",
           "-m", "swapformer.zoo", "_calibrate", f"{base}.calib-job.json"]
    subprocess.run(cmd, check=True)
    student.load_state_dict(load_file(job["weights"]))
    rec["calibration"] = {"nproc": work["nproc"], **json.loads(Path(job["result"]).read_text())}
    return student


def run_calibration_rank(job_path: Path) -> int:
    """Body of one ``torchrun`` rank: rebuild model and student, calibrate; rank 0 saves the result."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    import swapformer
    from swapformer.calibrate import calibrate
    from swapformer.offline import corpus_tokens

    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    job = json.loads(job_path.read_text())
    entry = ZooEntry(**job["entry"])
    built = build_model(entry)
    kinds = tuple(entry.settings.get("kinds", DEFAULTS["kinds"]))
    student = swapformer.rewrite(built.model, job["target"], example_inputs=built.inputs, kinds=kinds,
                                 **job["options"])
    data = corpus_tokens(entry.settings.get("corpus", "shakespeare"), built.tokenizer)
    try:
        result = calibrate(student, built.model, data, calibration_config(job["tokens"], entry.settings),
                           tokenizer=built.tokenizer)
        if rank == 0:
            # clones: tied weights (embeddings = LM head) share storage, which safetensors refuses
            state = {k: v.detach().cpu().clone().contiguous() for k, v in result.model.state_dict().items()}
            save_file(state, job["weights"])
            write_json(Path(job["result"]), calibration_summary(result))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def calibration_summary(result: Any) -> dict[str, Any]:
    """The JSON-able facts of a :class:`~swapformer.calibrate.CalibrationResult`."""
    return {"status": "ok", "tokens": result.tokens, "seconds": result.seconds,
            "eval_perplexity": result.eval_perplexity, "summary": result.summary()}


# save and measure


def _save(rec: dict[str, Any], built: Built, student: Any, target: str, work: dict[str, Any]) -> None:
    import swapformer

    entry = ZooEntry(**work["entry"])
    path = Path(work["out"]) / "models" / _slug(entry.name) / target
    kinds = tuple(entry.settings.get("kinds", DEFAULTS["kinds"]))
    meta = {"zoo_entry": entry.name, "model_spec": entry.model, "hf_config": entry.hf_config}
    swapformer.save(student, path, base_model=built.model, example_inputs=built.inputs, kinds=kinds,
                    metadata=json.loads(json.dumps(meta, default=str)))
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    rec["save"] = {"path": str(path.relative_to(work["out"])), "bytes": size}


def _measure(rec: dict[str, Any], built: Built, student: Any, target: str, work: dict[str, Any]) -> None:
    settings = ZooEntry(**work["entry"]).settings
    rec["params"] = _params(built.model, student)
    if student.swapformer_report.replaced:
        rec["flops_per_token"], rec["state_bytes"] = core_costs(student, target, settings["flops_contexts"])
    rec["speed"] = _speed(built, student, settings)
    rec["perplexity"] = _perplexity(built, student, settings)


def _params(original: Any, student: Any) -> dict[str, Any]:
    count = lambda m: sum(p.numel() for p in m.parameters())
    new = sum(p.numel() for r in student.swapformer_report.replaced
              for p in student.get_submodule(r.core_name).new_parameters())
    a, b = count(original), count(student)
    return {"original": a, "converted": b, "ratio": b / a if a else None, "new": new}


def core_costs(student: Any, target: str, contexts: list[int]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Summed per-token core FLOPs and decoding-state bytes of the replaced sites, original vs new.

    The original attention is dense softmax attention over the context (its KV cache is its state);
    a core without ``flops_per_token``/``state_bytes`` is counted as dense for exact targets and as
    unknown (``None``) otherwise.
    """
    from swapformer.targets.base import resolve_target

    exact = resolve_target(target).exact
    flops: dict[str, Any] = {"by_context": {}}
    state: dict[str, Any] = {"by_context": {}}
    for ctx in contexts:
        pairs = [_site_cost(student, r, ctx, exact) for r in student.swapformer_report.replaced]
        flops["by_context"][str(ctx)] = _sum_pair([p[0] for p in pairs])
        state["by_context"][str(ctx)] = _sum_pair([p[1] for p in pairs])
    first = flops["by_context"][str(contexts[0])]
    flops.update(context=contexts[0], ratio=first["ratio"])
    return flops, state


def _sum_pair(pairs: list[tuple[float | None, float | None]]) -> dict[str, Any]:
    orig = sum(p[0] for p in pairs if p[0] is not None)
    conv = None if any(p[1] is None for p in pairs) else sum(p[1] for p in pairs)
    return {"original": orig, "converted": conv, "ratio": conv / orig if conv is not None and orig else None}


def _site_cost(student: Any, rep: Any, ctx: int, exact: bool) -> tuple[tuple, tuple]:
    from swapformer.targets.reference import sdpa_flops_per_token

    site, core = rep.site, student.get_submodule(rep.core_name)
    if site.kind == "attention":
        dv = site.value_dim or site.head_dim
        dense = sdpa_flops_per_token(site.num_heads, site.head_dim, dv, ctx)
        kv = ctx * site.num_kv_heads * (site.head_dim + dv) * 4
    else:
        dense = 2 * (3 if site.gated else 2) * site.model_dim * site.hidden_size
        kv = 0
    flops = _call_cost(core, "flops_per_token", ctx)
    state = _call_cost(core, "state_bytes", ctx)
    if exact:
        flops, state = (dense if flops is None else flops), (kv if state is None else state)
    return (dense, flops), (kv, state)


def _call_cost(core: Any, name: str, ctx: int) -> float | None:
    fn = getattr(core, name, None)
    if fn is None:
        return None
    try:
        return float(fn(ctx))
    except TypeError:  # FFN cores take no context
        return float(fn())


def _bench_args(settings: dict[str, Any], **over: Any) -> BenchSettings:
    base = {"batch_size": settings["batch_size"], "seq_len": settings["seq_len"], "repeats": settings["repeats"],
            "decode_tokens": settings["decode_tokens"], "progress": False, "corpus": settings["corpus"],
            "ppl_batches": settings["ppl_batches"]}
    return BenchSettings(**{**base, **over})


def _speed(built: Built, student: Any, settings: dict[str, Any]) -> dict[str, Any]:
    """Prefill tokens/s and decode ms/token of both models, timed side by side.

    Encoder-decoder models are timed on their example inputs (``bench_speed`` feeds ``input_ids``
    alone to models with a vocabulary); a decode that fails (a core that cannot use the host's KV
    cache) is recorded and the prefill timed without it.
    """
    from swapformer import checkpoint

    recipe = {"rewrite": {"example_inputs": checkpoint.describe_inputs(built.check_inputs)}}
    config = getattr(built.model, "config", None)
    models = {"original": built.model, "converted": student}
    if getattr(config, "is_encoder_decoder", False):
        models = {name: _ExampleInputsOnly(m) for name, m in models.items()}
    decode = settings["decode_tokens"]
    # prefill + decoded tokens must fit the position table (OPT offsets positions by 2)
    max_pos = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    seq_len = min(settings["seq_len"], max_pos - decode - 2) if max_pos else settings["seq_len"]
    try:
        return _bench(models, recipe, _bench_args(settings, seq_len=seq_len, decode_tokens=decode))
    except Exception as e:  # noqa: BLE001 - retried without decoding, the error kept
        speed = _bench(models, recipe, _bench_args(settings, seq_len=seq_len, decode_tokens=0))
        speed["decode"]["error"] = f"{type(e).__name__}: {e}"[:500]
        return speed


class _ExampleInputsOnly:
    """Hides a model's ``config`` from ``bench_speed`` so that it is called with the example inputs."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs, use_cache=False)


def _bench(models: dict[str, Any], recipe: dict[str, Any], settings: BenchSettings) -> dict[str, Any]:
    prefill, decode = bench_speed(models, recipe, settings)[:2]
    speed = {k: {"metric": r.metric, "original": r.original, "converted": r.converted, "note": r.note}
             for k, r in (("prefill", prefill), ("decode", decode))}
    # Both as speed-ups (> 1: the converted model is faster): tokens/s up, ms/token down.
    speed["prefill"]["speedup"] = prefill.ratio
    speed["decode"]["speedup"] = 1 / decode.ratio if decode.ratio else None
    return speed


def _perplexity(built: Built, student: Any, settings: dict[str, Any]) -> dict[str, Any]:
    if built.tokenizer is None:
        return {"skipped": "the model has no tokenizer"}
    if not _has_logits(built.model):
        return {"skipped": "the model has no language-model head"}
    bench_settings = _bench_args(settings, seq_len=settings["ppl_seq_len"], batch_size=2)
    rows = bench_perplexity({"original": built.model, "converted": student}, built.tokenizer, bench_settings)
    if not rows:
        return {"skipped": "ppl_batches = 0"}
    r = rows[0]
    if r.original is None:
        return {"skipped": r.note}
    return {"metric": r.metric, "original": r.original, "converted": r.converted, "ratio": r.ratio}


if __name__ == "__main__":
    sys.exit(main())
