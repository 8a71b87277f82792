"""Verification of a rewrite: exactness for exact targets, and finite / causal / batch-independent
outputs."""

from __future__ import annotations

from typing import Any

import torch

from swapformer.rewriter.capture import normalize_inputs
from swapformer.rewriter.verify import first_tensor
from swapformer.zoo.build import Built, rewrite_is_exact


def verify_step(rec: dict[str, Any], built: Built, student: Any, target: str, work: dict[str, Any]) -> None:
    """The verify step of :func:`~swapformer.zoo.worker.run_target`: invariants into ``rec``."""
    report = student.swapformer_report
    checks = check_invariants(built.model, student, built.check_inputs)
    exact = rewrite_is_exact(student)
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
    extra = {"use_cache": False} if "input_ids" in kwargs or "decoder_input_ids" in kwargs else {}
    return first_tensor(model(*args, **kwargs, **extra)).float()


def _same(a: Any, b: Any) -> bool:
    if a.shape != b.shape or a.numel() == 0:
        return a.shape == b.shape
    scale = max(1.0, float(a.abs().max()))
    return float((a - b).abs().max()) <= 1e-5 * scale


def _sequence_slot(args: tuple, kwargs: dict) -> tuple[str | int, Any] | None:
    """Where the token/sequence input is: a kwarg name or a positional index."""
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
    if x.is_floating_point():
        return x + torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=x.dtype)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or int(x.max()) + 2
    return (x + 1) % vocab


def _perturb_last(model: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """The inputs with the last position of the sequence input changed (None: fewer than 2)."""
    return _perturbed(model, args, kwargs, dim=1, where=(slice(None), slice(-1, None)))


def _perturb_row(model: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """The inputs with every batch row but the first changed (None: fewer than 2 rows)."""
    return _perturbed(model, args, kwargs, dim=0, where=(slice(1, None),))


def _perturbed(model: Any, args: tuple, kwargs: dict, dim: int, where: tuple) -> tuple[tuple, dict] | None:
    found = _sequence_slot(args, kwargs)
    if found is None or found[1].shape[dim] < 2:
        return None
    slot, x = found
    y = x.clone()
    y[where] = _changed(x[where], model)
    return _replaced(args, kwargs, slot, y)
