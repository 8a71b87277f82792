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
both models timed in alternating rounds (:func:`swapformer.measure.bench.bench_speed`), and perplexity on the
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

``--target auto`` plans each model per layer under ``[targets.auto] budget = "decode@32768=3"`` (any
``target="auto"`` option; see :mod:`swapformer.planner`), measured on ``plan_batches`` x
``plan_seq_len`` tokens (default 2 x 256) of ``corpus`` (random ids for a model without a tokenizer);
the record's ``rewrite.plan`` holds the plan.

Other per-model keys: ``targets`` (restrict), ``options`` (``{window = {window = 4}}``), ``kinds``,
``attn_implementation``, ``timeout``, ``seq_len``. Relative paths resolve against the zoo file.

timm entries need timm, which needs ``torch==2.14.1`` and ``torchvision==0.29.1``: in an interpreter
without timm they are recorded as skipped. Run the zoo with the timm venv to include them::

    python3 -m venv .venv-timm && .venv-timm/bin/pip install torch==2.14.1 torchvision==0.29.1 timm \
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
import fnmatch
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from swapformer.rewriter.api import PLANNERS
from swapformer.targets.base import available_targets
from swapformer.zoo.calibration import run_calibration_rank
from swapformer.zoo.records import pending_targets, record_all, record_path, slug, write_json
from swapformer.zoo.report import format_summary, write_reports
from swapformer.zoo.spec import DEFAULTS, Zoo, ZooEntry, parse_shard, read_zoo, shard
from swapformer.zoo.worker import run_worker

log = logging.getLogger(__name__)
PROG = "swapformer zoo"


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
    except (OSError, ValueError) as e:  # tomllib.TOMLDecodeError is a ValueError
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    args.argv = argv
    return run_zoo(zoo, targets, args)


def _setup_logging(quiet: bool) -> None:
    if quiet or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("zoo: %(message)s"))
    package_log = logging.getLogger("swapformer.zoo")  # the runner's, records' and report's loggers
    package_log.addHandler(handler)
    package_log.setLevel(logging.INFO)


def parse_targets(text: str) -> list[str]:
    """``"sdpa,window"``, ``"all"`` (every target, no planner) or a planner (``"auto"``) → names.

    Raises:
        ValueError: an unknown target.
    """
    known = available_targets()
    names = known if text.strip() == "all" else [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in names if t not in known and t not in PLANNERS]
    if bad or not names:
        raise ValueError(f"unknown target(s) {bad}; available targets: {', '.join(known)}, or a planner: "
                         f"{', '.join(PLANNERS)}")
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
            record_all(out, entry, todo, "skipped", entry.skip_reason)
        else:
            jobs.append(_work_file(out, zoo, entry, todo, args))
    run_workers(jobs, max(1, args.jobs), args.timeout)
    report = write_reports(out, zoo, targets, args.argv)
    print(format_summary(report))
    return 0


def _work_file(out: Path, zoo: Zoo, entry: ZooEntry, todo: list[str], args: argparse.Namespace) -> Path:
    """Write what the worker needs to know about ``entry`` to ``DIR/jobs/<name>.json``."""
    options = {t: {**zoo.target_options.get(t, {}), **entry.settings.get("options", {}).get(t, {})}
               for t in todo}
    threads = max(1, (os.cpu_count() or 1) // max(1, args.jobs))
    work = {"entry": dataclasses.asdict(entry), "targets": todo, "target_options": options,
            "out": str(out.resolve()), "calibrate_tokens": args.calibrate_tokens,
            "nproc": args.nproc, "threads": threads,
            "timeout": args.timeout or entry.settings.get("timeout") or DEFAULTS["timeout"]}
    path = out / "jobs" / f"{slug(entry.name)}.json"
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
        record_all(out, entry, missing, status, reason, {"log_tail": tail, "seconds": {"total": seconds}})
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
