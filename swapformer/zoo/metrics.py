"""Measurements of a converted model next to its original: parameters, core FLOPs and state, speed,
perplexity."""

from __future__ import annotations

from typing import Any

from swapformer import checkpoint
from swapformer.measure.bench import BenchSettings, bench_perplexity, bench_speed
from swapformer.targets.reference import sdpa_flops_per_token
from swapformer.zoo.build import Built, has_logits, rewrite_is_exact
from swapformer.zoo.spec import ZooEntry


def measure_step(rec: dict[str, Any], built: Built, student: Any, target: str, work: dict[str, Any]) -> None:
    """The measure step of :func:`~swapformer.zoo.worker.run_target`: parameters, core costs, speed, perplexity."""
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
    exact = rewrite_is_exact(student)
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
    value = getattr(core, name)(ctx)  # declared by every TargetModule; None where not counted
    return None if value is None else float(value)


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
    if not has_logits(built.model):
        return {"skipped": "the model has no language-model head"}
    bench_settings = _bench_args(settings, seq_len=settings["ppl_seq_len"], batch_size=2)
    rows = bench_perplexity({"original": built.model, "converted": student}, built.tokenizer, bench_settings)
    if not rows:
        return {"skipped": "ppl_batches = 0"}
    r = rows[0]
    if r.original is None:
        return {"skipped": r.note}
    return {"metric": r.metric, "original": r.original, "converted": r.converted, "ratio": r.ratio}
