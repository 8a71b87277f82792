"""Detection coverage on timm's ViT-like architectures: attention blocks vs the sites swapformer finds.

Run it from the repository root with the timm venv (timm needs torch==2.14.1 + torchvision==0.29.1, see
swapformer.zoo.runner; ``PYTHONPATH=.`` unless swapformer is installed there)::

    PYTHONPATH=. .venv-timm/bin/python benchmarks/timm_coverage.py [--families 'vit_*' 'swin*' ...] [--limit N]
        [--max-params 100e6] [--img-size 64] [--timeout 30] [--json out.json] [--write]

Architectures: the models of each family glob (``timm.list_models``), minus sizes named like
large/huge/giant and resolution variants, keeping one model per distinct module structure (the
smallest, counted on the meta device) and at most ``--max-params`` parameters. ``--limit N`` keeps
N of them, taken in turn from each family, smallest first. Each one is built with random weights
(``pretrained=False``) at ``--img-size`` where the model takes an ``img_size`` and runs at it (else
at its default size), batch 1; every constant-filled weight (norm weights, layer scales, learned
temperatures) is then redrawn in [0.5, 1.5] so that no attention branch is
multiplied away (``spread_constant_parameters``).

Ground truth: the outermost modules whose class name contains ``Attention``/``Attn`` (or is ConViT's
``GPSA``/``MHSA``, XCiT's ``XCA``) or whose name ends in ``.attn``. swapformer: the attention sites of
``rewrite(model, "sdpa", verify=False)``, how many of them lie inside a ground-truth module, how many
were replaced, and whether the rewritten model matches the original (relative max |Δ| ≤ 1e-5).
A model that fails to build or takes longer than ``--timeout`` seconds is listed with the reason.
``--write`` appends the table to ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import fnmatch
import json
import platform
import re
import signal
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"

FAMILIES = (
    "vit_*", "deit*", "beit*", "eva*", "cait_*", "xcit_*", "swin*", "levit*", "pit_*", "crossvit*",
    "convit*", "tnt_*", "twins_*", "coat_*", "mvitv2*", "volo_*", "flexivit*", "vitamin*", "hiera*",
    "davit*", "efficientformer*", "nest_*", "pvt_v2*", "maxvit*", "maxxvit*", "coatnet*", "gcvit*",
    "tiny_vit*", "naflexvit*", "visformer*", "nextvit*", "fastvit*", "edgenext*", "mobilevit*",
    "aimv2*", "sam2_hiera*",
)
LARGE = ("*large*", "*huge*", "*giant*", "*gigantic*", "*enormous*", "*_1b_*", "*_3b_*", "*_5b_*",
         "*_7b_*", "*sapiens*", "*_xl_*", "*xlarge*")
ATTN_CLASS = re.compile(r"Attention|Attn|^XCA$|^GPSA$|^MHSA$")
NOT_ATTN_CLASS = re.compile(r"Drop|Norm|Block|Layer|Stage|Mlp")
EXACT_RTOL = 1e-5


class Timeout(BaseException):
    """Raised by the alarm; a BaseException so that capture fallbacks do not swallow it."""


@dataclass
class Row:
    """One architecture's result."""

    family: str
    model: str
    params: int = 0
    img_size: int | None = None
    expected: int = 0
    classes: list[str] = field(default_factory=list)
    found: int = 0  # attention sites inside ground-truth modules
    extra: int = 0  # attention sites elsewhere
    replaced: int = 0
    exact: bool | None = None
    rel_diff: float | None = None
    capture: str = ""
    seconds: float = 0.0
    status: str = "ok"  # ok, build-failed, timeout, error, skipped
    note: str = ""
    missed: list[str] = field(default_factory=list)  # ground-truth classes without a site
    skips: list[str] = field(default_factory=list)  # swapformer's skip reasons
    why: dict[str, list[str]] = field(default_factory=dict)  # missed class -> detector's reasons


# picking the architectures


def candidates(families: list[str], include_large: bool) -> dict[str, str]:
    """Model name → family glob, in family order; one name per resolution variant."""
    import timm

    picked: dict[str, str] = {}
    seen_base: set[str] = set()
    for fam in families:
        for name in timm.list_models(fam):
            if name in picked or (not include_large and any(fnmatch.fnmatchcase(name, p) for p in LARGE)):
                continue
            base = re.sub(r"_\d{3,4}$", "", name)
            if base in seen_base:
                continue
            seen_base.add(base)
            picked[name] = fam
    return picked


def structure(name: str) -> tuple[int, tuple[str, ...]] | None:
    """Parameter count and module-class signature of a model built on the meta device."""
    import timm

    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False, num_classes=10)
    except Exception:  # noqa: BLE001 - the real build records the error
        return None
    sig = (type(model).__name__, *sorted({type(m).__name__ for m in model.modules()}))
    return sum(p.numel() for p in model.parameters()), sig


def select(names: dict[str, str], max_params: float, limit: int | None) -> tuple[list[Row], list[Row]]:
    """Smallest model per structure (rows to run) and the rows skipped before running."""
    best: dict[tuple[str, ...], tuple[int, str]] = {}
    skipped: list[Row] = []
    unbuilt: list[str] = []
    for name in names:
        got = structure(name)
        if got is None:
            unbuilt.append(name)
            continue
        params, sig = got
        if sig not in best or params < best[sig][0]:
            best[sig] = (params, name)
    chosen = {name: params for params, name in best.values()}
    by_family: dict[str, list[Row]] = collections.defaultdict(list)
    for name, fam in names.items():
        if name in chosen and chosen[name] > max_params:
            skipped.append(Row(fam, name, params=chosen[name], status="skipped", note="over --max-params"))
        elif name in chosen or name in unbuilt:
            by_family[fam].append(Row(fam, name, params=chosen.get(name, 0)))
    # smallest first within a family (unbuilt ones, params 0, first: their failure is the result)
    groups = [sorted(rows, key=lambda r: r.params) for rows in by_family.values()]
    return _round_robin(groups, limit), skipped


def _round_robin(groups: list[list[Row]], limit: int | None) -> list[Row]:
    rows: list[Row] = []
    for i in range(max((len(g) for g in groups), default=0)):
        rows += [g[i] for g in groups if i < len(g)]
    return rows[:limit] if limit else rows


# measuring one architecture


def attention_modules(model: torch.nn.Module) -> dict[str, str]:
    """Ground truth: the outermost attention modules, name → class name."""
    found: dict[str, str] = {}
    for name, module in model.named_modules():
        cls = type(module).__name__
        by_class = ATTN_CLASS.search(cls) and not NOT_ATTN_CLASS.search(cls)
        by_name = name.rsplit(".", 1)[-1] == "attn" and any(True for _ in module.parameters())
        if name and (by_class or by_name) and not any(name.startswith(f"{p}.") for p in found):
            found[name] = cls
    return found


def build(name: str, img_size: int) -> tuple[torch.nn.Module, int]:
    """The model at ``img_size`` if it takes one and runs at it, else at its default size."""
    import timm

    from swapformer.zoo.build import create_timm_model

    return create_timm_model(timm, name, img_size)


def spread_constant_parameters(model: torch.nn.Module, seed: int = 0) -> None:
    """Redraw every constant-filled weight (not biases) uniformly in [0.5, 1.5], in place.

    timm initialises some of them so that a block's attention cannot reach the output: Swin V2's
    (and V2-cr's) res-post-norm weights are 0 and EdgeNeXt's layer scales 1e-6; XCiT's temperatures
    are all 1. Compared at that init, a rewrite that dropped the attention (or its
    temperature) would still be "exact"; redrawn, every attention branch moves the output.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.is_floating_point() and not name.endswith("bias") and bool((p == p.flatten()[0]).all()):
                p.copy_(torch.rand(p.shape, generator=gen, dtype=p.dtype) + 0.5)


def measure(row: Row, img_size: int) -> None:
    """Fill ``row``: build, ground truth, rewrite to sdpa, exactness."""
    import swapformer
    from swapformer.rewriter.verify import first_tensor, relative_diff

    torch.manual_seed(0)
    try:
        model, row.img_size = build(row.model, img_size)
    except Exception as e:  # noqa: BLE001
        row.status, row.note = "build-failed", f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
        return
    row.params = sum(p.numel() for p in model.parameters())
    spread_constant_parameters(model)
    gt = attention_modules(model)
    row.expected, row.classes = len(gt), sorted(set(gt.values()))
    x = torch.randn(1, 3, row.img_size, row.img_size, generator=torch.Generator().manual_seed(0))
    try:
        out = swapformer.rewrite(model, "sdpa", example_inputs=(x,), verify=False)
    except Exception as e:  # noqa: BLE001
        row.status, row.note = "error", f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        row.missed = row.classes
        return
    _record_sites(row, out.swapformer_report, gt)
    if row.replaced:
        with torch.no_grad():
            _, row.rel_diff = relative_diff(first_tensor(model(x)), first_tensor(out(x)))
        row.exact = row.rel_diff <= EXACT_RTOL


def _record_sites(row: Row, report: Any, gt: dict[str, str]) -> None:
    inside = lambda s: next((m for m in gt if s.module == m or s.module.startswith(f"{m}.")), None)
    sites = [s for s in report.sites if s.kind == "attention"]
    owners = [inside(s) for s in sites]
    row.found = sum(o is not None for o in owners)
    row.extra = len(sites) - row.found
    row.replaced = len(report.replaced)
    row.capture = report.capture
    covered = {o for o in owners if o}
    row.missed = sorted({cls for m, cls in gt.items() if m not in covered})
    row.skips = sorted({s.reason for s in report.skipped})


def miss_reasons(row: Row, img_size: int) -> None:
    """Why the detector passed over the softmax/SDPA nodes of the missed modules (its ``misses``)."""
    from swapformer.patterns.attention import owner_module
    from swapformer.rewriter.api import analyze

    torch.manual_seed(0)
    model, size = build(row.model, img_size)
    spread_constant_parameters(model)
    gt = attention_modules(model)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    det = analyze(model, (x,), ("attention",)).detection
    nodes = {n.name: n for n in det.graph.gm.graph.nodes}
    why: dict[str, set[str]] = collections.defaultdict(set)
    for node_name, reason in det.misses:
        owner = owner_module(nodes[node_name]) if node_name in nodes else None
        gt_name = owner and next((m for m in gt if owner[0] == m or owner[0].startswith(f"{m}.")), None)
        cls = gt.get(gt_name, "outside attention modules") if gt_name else "outside attention modules"
        why[cls].add(re.sub(r"\d+", "N", reason)[:160])
    row.why = {cls: sorted(reasons)[:3] for cls, reasons in why.items()}
    for cls in row.missed:
        row.why.setdefault(cls, ["no softmax or SDPA node reached the detector's attention check"])


def _with_alarm(seconds: float, fn: Any, *args: Any) -> bool:
    """Run ``fn(*args)``; False when it took longer than ``seconds`` (it is interrupted)."""

    def alarm(signum: int, frame: Any) -> None:
        raise Timeout

    old = signal.signal(signal.SIGALRM, alarm)
    # re-armed every second: an alarm that lands in a finalizer is swallowed there
    signal.setitimer(signal.ITIMER_REAL, seconds, 1.0)
    try:
        fn(*args)
        return True
    except Timeout:
        signal.setitimer(signal.ITIMER_REAL, 0)
        torch._dynamo.reset()
        return False
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def run_one(row: Row, img_size: int, timeout: float) -> Row:
    """Measure one architecture within ``timeout`` s, then (another ``timeout``) explain its misses."""
    start = time.perf_counter()
    if not _with_alarm(timeout, measure, row, img_size):
        row.status, row.note = "timeout", f"over {timeout:.0f} s"
    row.seconds = time.perf_counter() - start
    if row.status == "ok" and row.missed:
        try:
            if not _with_alarm(timeout, miss_reasons, row, img_size):
                row.why = {cls: ["(explaining the miss took too long)"] for cls in row.missed}
        except Exception as e:  # noqa: BLE001
            row.why = {cls: [f"(could not explain: {type(e).__name__})"] for cls in row.missed}
    return row


# the report


def _cell(row: Row) -> list[str]:
    exact = "-" if row.exact is None else ("yes" if row.exact else f"no ({row.rel_diff:.1e})")
    note = row.note or ("; ".join(row.skips)[:120] if row.skips else "")
    if row.missed and row.status == "ok":
        note = (f"missed: {', '.join(row.missed)}. " + note).strip()
    return [row.family, row.model, f"{row.params / 1e6:.1f}M", str(row.img_size or "-"),
            f"{row.expected} ({', '.join(row.classes)})" if row.classes else str(row.expected),
            str(row.found), str(row.extra), str(row.replaced), exact, row.capture or "-",
            f"{row.seconds:.1f}", row.status, note.replace("|", "/")]


def table(rows: list[Row]) -> str:
    head = ["family", "model", "params", "img", "attention modules (classes)", "sites found", "extra sites",
            "replaced", "sdpa exact", "capture", "s", "status", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_cell(r)) + " |" for r in rows]
    return "\n".join(lines)


def summary(rows: list[Row]) -> str:
    ran = [r for r in rows if r.status == "ok"]
    expected = sum(r.expected for r in ran)
    found = sum(min(r.found, r.expected) for r in ran)
    with_sites = [r for r in ran if r.replaced]
    exact = sum(bool(r.exact) for r in with_sites)
    full = sum(r.found >= r.expected > 0 and bool(r.exact) and r.replaced >= r.found for r in ran)
    failed = collections.Counter(r.status for r in rows if r.status != "ok")
    return (f"**Summary:** {len(ran)}/{len(rows)} architectures covered ({dict(failed) or 'none'} not run); "
            f"attention sites found {found}/{expected} expected ({100 * found / max(expected, 1):.0f}%); "
            f"sdpa exact on {exact}/{len(with_sites)} architectures with replaced sites; "
            f"fully covered (every attention module found, replaced and exact) {full}/{len(ran)}.")


def misses_by_family(rows: list[Row]) -> str:
    """Families where detection missed modules or the rewrite was not exact, with the reasons."""
    fams: dict[str, list[str]] = collections.defaultdict(list)
    for r in rows:
        problems = []
        if r.status == "ok" and r.found < r.expected:
            why = "; ".join(f"{cls}: {' / '.join(reasons)}" for cls, reasons in r.why.items()
                            if cls in r.missed)
            problems.append(f"{r.found}/{r.expected} found, missed {', '.join(r.missed)}"
                            + (f" (detector: {why})" if why else ""))
        if r.status == "error":
            problems.append(r.note)
        if r.exact is False:
            problems.append(f"not exact ({r.rel_diff:.1e})")
        if r.skips and r.status == "ok":
            problems.append("skipped sites: " + "; ".join(r.skips))
        if problems:
            fams[r.family].append(f"{r.model}: " + "; ".join(problems))
    if not fams:
        return "No misses."
    return "\n".join(f"- `{fam}`: " + " · ".join(items) for fam, items in fams.items())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="*", default=list(FAMILIES), help="timm.list_models globs")
    parser.add_argument("--limit", type=int, help="run at most N architectures (taken across families)")
    parser.add_argument("--max-params", type=float, default=100e6, help="skip bigger models (default 1e8)")
    parser.add_argument("--include-large", action="store_true", help="keep large/huge/giant names")
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per architecture (default 30)")
    parser.add_argument("--json", help="also write the rows as JSON")
    parser.add_argument("--write", action="store_true", help=f"append the result to {RESULTS}")
    args = parser.parse_args()
    try:
        import timm
    except Exception as e:  # noqa: BLE001
        sys.exit(f"timm is not importable ({e}); run this with .venv-timm/bin/python (see swapformer.zoo.runner)")
    warnings.filterwarnings("ignore")
    start = time.time()
    names = candidates(args.families, args.include_large)
    rows, skipped = select(names, args.max_params, args.limit)
    print(f"{len(names)} candidate names, {len(rows)} architectures to run", file=sys.stderr)
    for i, row in enumerate(rows, 1):
        run_one(row, args.img_size, args.timeout)
        print(f"[{i}/{len(rows)}] {row.model}: {row.status} {row.found}/{row.expected} "
              f"exact={row.exact} {row.seconds:.1f}s {row.note[:80]}", file=sys.stderr)
    text = report(rows + skipped, args, timm.__version__, time.time() - start)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows + skipped], indent=1))
    if args.write:
        with RESULTS.open("a") as f:
            f.write("\n" + text)
    return 0


def report(rows: list[Row], args: argparse.Namespace, timm_version: str, seconds: float) -> str:
    command = "python benchmarks/timm_coverage.py " + " ".join(sys.argv[1:])
    header = (f"## timm ViT-family coverage: attention modules vs swapformer sites\n\n"
              f"{datetime.date.today()}, {platform.machine()} CPU ({torch.get_num_threads()} threads), "
              f"torch {torch.__version__}, timm {timm_version}, {seconds / 60:.1f} min. "
              f"Command: `{command.strip()}`\n")
    return "\n".join([header, table(rows), "", summary(rows), "", "Misses by family:", "",
                      misses_by_family(rows), ""])


if __name__ == "__main__":
    sys.exit(main())
