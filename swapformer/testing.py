"""Test helpers for swapformer users: exactness checks and hypothesis strategies.

* :func:`assert_rewrite_exact` rewrites a model and checks that its outputs did not move;
  :func:`assert_same_outputs` and :func:`check_equivalence` compare two models directly.
* :func:`assert_sites_match` compares detected sites with expected field values.
* :func:`attention_programs` and :func:`ffn_programs` generate small modules from a grammar of the
  spellings swapformer detects, each with the site fields detection must report;
  :func:`input_tensors` draws example tensors.

swapformer's API and hypothesis are imported inside the functions that need them, so importing this
module costs nothing and works without hypothesis installed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from hypothesis.strategies import SearchStrategy

    from swapformer.rewriter.report import RewriteReport
    from swapformer.sites import Site

ExampleInputs = torch.Tensor | tuple[Any, ...] | Mapping[str, Any]

__all__ = [
    "AttentionChoices",
    "FFNChoices",
    "Program",
    "assert_rewrite_exact",
    "assert_same_outputs",
    "assert_sites_match",
    "attention_program",
    "attention_programs",
    "call_model",
    "check_equivalence",
    "ffn_program",
    "ffn_programs",
    "input_tensors",
]


def call_model(model: nn.Module, example_inputs: ExampleInputs) -> Any:
    """Call ``model`` the way swapformer calls it with ``example_inputs``.

    Args:
        model: the module to run.
        example_inputs: a tensor (one positional argument), a tuple (positional arguments) or a
            mapping (keyword arguments).

    Returns:
        Whatever ``model`` returns.
    """
    if isinstance(example_inputs, Mapping):
        return model(**example_inputs)
    if isinstance(example_inputs, tuple):
        return model(*example_inputs)
    return model(example_inputs)


# comparing outputs


def _tensor_leaves(obj: Any, path: str = "output") -> dict[str, torch.Tensor]:
    """Tensors inside nested tuples/lists/mappings (HF ``ModelOutput`` included), by path.
    Anything else (a KV cache object, ``None``) is not an output to compare."""
    if isinstance(obj, torch.Tensor):
        return {path: obj}
    leaves: dict[str, torch.Tensor] = {}
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            leaves.update(_tensor_leaves(value, f"{path}.{key}"))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            leaves.update(_tensor_leaves(value, f"{path}[{i}]"))
    return leaves


def _relative_diff(ref: torch.Tensor, out: torch.Tensor) -> float:
    """``max |ref - out| / max |ref|``; ``inf`` for a shape change or a NaN in only one of them."""
    if ref.shape != out.shape:
        return math.inf
    if not ref.is_floating_point():
        return 0.0 if torch.equal(ref, out) else math.inf
    if ref.numel() == 0:
        return 0.0
    ref, out = ref.detach().double(), out.detach().double()
    both_nan = ref.isnan() & out.isnan()
    diff = (ref - out).abs().masked_fill(both_nan, 0.0)
    if diff.isnan().any():
        return math.inf
    scale = ref.masked_fill(both_nan, 0.0).abs().max().item()
    return diff.max().item() / max(scale, 1e-6)


def _recorder(store: dict[str, torch.Tensor], key: str, read: Callable[..., Any]) -> Callable:
    def hook(_module: nn.Module, args: tuple, *out: Any) -> None:
        value = read(args, *out)
        if isinstance(value, torch.Tensor):
            store[key] = value.detach()

    return hook


def _record(
    model: nn.Module, taps: dict[str, tuple[str, str]], example_inputs: ExampleInputs
) -> dict[str, torch.Tensor]:
    """Run ``model`` once, recording for each key the input (``"in"``) or output (``"out"``) of the
    submodule named in ``taps``; submodules that are missing or never called record nothing."""
    store: dict[str, torch.Tensor] = {}
    handles = []
    for key, (name, side) in taps.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        if side == "in":
            hook = _recorder(store, key, lambda args: args[0] if args else None)
            handles.append(module.register_forward_pre_hook(hook))
        else:
            hook = _recorder(store, key, lambda args, out: out)
            handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            call_model(model, example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    return store


def _module_of(weight: str) -> str:
    return weight.rsplit(".", 1)[0] if "." in weight else ""


def _host_taps(report: RewriteReport) -> dict[str, tuple[str, str]]:
    """Where the original model exposes what each core computes: the input of the attention's
    output projection (heads merged), or the output of the FFN's down projection."""
    taps = {}
    for r in report.replaced:
        site = r.site
        if getattr(site, "o_proj", None) is not None:
            taps[site.name] = (_module_of(site.o_proj.weight), "in")
        elif getattr(site, "down_proj", None) is not None:
            taps[site.name] = (_module_of(site.down_proj.weight), "out")
    return taps


def _worst_site(
    original: nn.Module, rewritten: nn.Module, example_inputs: ExampleInputs, report: RewriteReport
) -> str:
    """Name the replaced site whose core output is furthest from what the host computed there."""
    host = _record(original, _host_taps(report), example_inputs)
    cores = {r.site.name: (r.core_name, "out") for r in report.replaced}
    core = _record(rewritten, cores, example_inputs)
    diffs = []
    for name, out in core.items():
        ref = host.get(name)
        if ref is None:
            continue
        if out.dim() == 4:
            out = out.transpose(1, 2).flatten(2)  # [B, H, T, Dv] -> [B, T, H * Dv]
        same_size = out.numel() == ref.numel()
        diffs.append((_relative_diff(ref, out.reshape(ref.shape)) if same_size else math.inf, name))
    if not diffs:
        return "no replaced site could be compared on its own"
    worst, name = max(diffs)
    site = next(r.site for r in report.replaced if r.site.name == name)
    return f"worst site: {site.name} ({site.module_type}), core output differs by {worst:.3g}"


def assert_same_outputs(
    original: nn.Module,
    rewritten: nn.Module,
    example_inputs: ExampleInputs,
    *,
    rtol: float = 1e-5,
    report: RewriteReport | None = None,
) -> float:
    """Check that two models give the same outputs on ``example_inputs``.

    Every tensor in ``original``'s output (through nested tuples, lists, mappings and HF
    ``ModelOutput``) must appear in ``rewritten``'s output with the same shape and
    ``max |Δ| <= rtol * max |original|``. Runs under ``torch.no_grad()``; put both models in eval
    mode first if they hold dropout.

    Args:
        original: the reference model.
        rewritten: the model under test.
        example_inputs: a tensor, a tuple of positional arguments or a mapping of keyword arguments.
        rtol: tolerance relative to the largest magnitude of each reference output.
        report: the rewrite's report; when given, a failure also names the worst replaced site.

    Returns:
        The largest relative difference over all outputs.

    Raises:
        AssertionError: an output is missing, changed shape, or differs beyond ``rtol``.
    """
    with torch.no_grad():
        expected = _tensor_leaves(call_model(original, example_inputs))
        actual = _tensor_leaves(call_model(rewritten, example_inputs))
    missing = sorted(set(expected) - set(actual))
    if missing:
        raise AssertionError(f"the rewritten model does not return {missing}")
    diffs = {path: _relative_diff(ref, actual[path]) for path, ref in expected.items()}
    path, worst = max(diffs.items(), key=lambda item: item[1], default=("", 0.0))
    if worst <= rtol:
        return worst
    ref, out = expected[path], actual[path]
    lines = [
        f"{path} differs by {worst:.3g} relative to its scale (rtol {rtol:g}); "
        f"shapes {tuple(ref.shape)} vs {tuple(out.shape)}"
    ]
    if report is not None:
        lines += [_worst_site(original, rewritten, example_inputs, report), str(report)]
    raise AssertionError("\n".join(lines))


def assert_rewrite_exact(
    model: nn.Module,
    example_inputs: ExampleInputs,
    target: str = "sdpa",
    *,
    rtol: float = 1e-5,
    allow_empty: bool = False,
    **target_options: Any,
) -> RewriteReport:
    """Rewrite ``model`` to ``target`` and check that its outputs did not change.

    Meant for exact targets (``"sdpa"``): any difference there is a detection bug.

    Args:
        model: the model to rewrite, in eval mode; it is not modified.
        example_inputs: a tensor, a tuple of positional arguments or a mapping of keyword arguments.
        target: the registry name or config of the target.
        rtol: tolerance relative to the largest magnitude of each output.
        allow_empty: accept a rewrite that replaced no site.
        **target_options: passed on to :func:`swapformer.rewrite` (e.g. ``kinds=``).

    Returns:
        The rewrite's :class:`RewriteReport`.

    Raises:
        AssertionError: nothing was replaced (unless ``allow_empty``), or the outputs differ; the
            message names the worst output and the worst replaced site, followed by the report.
    """
    from swapformer import rewrite

    rewritten = rewrite(model, target, example_inputs=example_inputs, **target_options)
    report = rewritten.swapformer_report
    if not report.replaced and not allow_empty:
        raise AssertionError(f"rewrite to {target!r} replaced no site\n{report}")
    assert_same_outputs(model, rewritten, example_inputs, rtol=rtol, report=report)
    return report


def check_equivalence(
    original: nn.Module,
    rewritten: nn.Module,
    inputs_strategy: SearchStrategy[Any],
    *,
    max_examples: int = 20,
    rtol: float = 1e-5,
) -> None:
    """Compare two models on inputs drawn by hypothesis; call it from a plain (non-``@given``) test.

    Args:
        original: the reference model.
        rewritten: the model under test.
        inputs_strategy: draws example inputs (a tensor, a tuple or a mapping), e.g.
            ``input_tensors((2, 16, 64))``.
        max_examples: how many inputs to try.
        rtol: tolerance relative to each output's largest magnitude.

    Raises:
        AssertionError: for the simplest input hypothesis finds on which the outputs differ.
    """
    from hypothesis import HealthCheck, given, settings

    @settings(
        max_examples=max_examples, deadline=None, suppress_health_check=[HealthCheck.too_slow]
    )
    @given(inputs_strategy)
    def run(example_inputs: Any) -> None:
        assert_same_outputs(original, rewritten, example_inputs, rtol=rtol)

    run()


def _mismatches(site: Site, expected: Mapping[str, Any]) -> list[str]:
    bad = []
    for key, want in expected.items():
        got = getattr(site, key, "<missing>")
        numeric = isinstance(want, float) and isinstance(got, (int, float))
        same = math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-12) if numeric else got == want
        if not same:
            bad.append(f"{key}: expected {want!r}, got {got!r}")
    return bad


def assert_sites_match(
    sites: Sequence[Site], expected: Sequence[Mapping[str, Any]], *, kind: str | None = None
) -> None:
    """Check that the detected sites are exactly the expected ones, in any order.

    Args:
        sites: what :func:`swapformer.find_sites` returned.
        expected: one mapping per site, from field name (``num_heads``, ``scale``, ``activation``,
            ...) to value; floats compare with a relative tolerance of 1e-6, the rest with ``==``.
            Fields left out are not checked.
        kind: compare only sites of this kind (``"attention"`` or ``"ffn"``).

    Raises:
        AssertionError: the counts differ, or an expected mapping matches no remaining site (the
            message lists the closest site's wrong fields).
    """
    found = [s for s in sites if kind is None or s.kind == kind]
    label = f"{kind} sites" if kind else "sites"
    if len(found) != len(expected):
        listing = "".join(f"\n  {s.name} ({s.module_type})" for s in found)
        raise AssertionError(f"expected {len(expected)} {label}, found {len(found)}:{listing}")
    unused = list(found)
    for want in expected:
        scored = [(_mismatches(site, want), i) for i, site in enumerate(unused)]
        bad, i = min(scored, key=lambda pair: len(pair[0]))
        if bad:
            closest = f"closest {unused[i].name} ({unused[i].module_type})"
            raise AssertionError(
                f"no {label[:-1]} matches {dict(want)}; {closest}: " + "; ".join(bad)
            )
        unused.pop(i)


# strategies


def _strategies() -> Any:
    try:
        from hypothesis import strategies
    except ImportError as err:  # pragma: no cover - depends on the environment
        message = "swapformer.testing strategies need hypothesis: pip install 'swapformer[dev]'"
        raise ImportError(message) from err
    return strategies


def _seeded_module(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    """Build with a fixed seed without touching the global RNG; norm gains drawn around 1."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = build()
        for m in module.modules():
            if isinstance(m, (nn.LayerNorm, nn.RMSNorm)) and m.weight is not None:
                nn.init.normal_(m.weight, 1.0, 0.1)
    return module.eval()


def input_tensors(
    shape: Sequence[int] | SearchStrategy[Sequence[int]],
    dtype: torch.dtype = torch.float32,
    *,
    low: float | None = None,
    high: float | None = None,
) -> SearchStrategy[torch.Tensor]:
    """A hypothesis strategy for tensors of one shape and dtype.

    Elements come from a seeded torch generator (hypothesis draws the seed and a magnitude), so
    large tensors stay cheap and failures reproduce.

    Args:
        shape: the shape, or a strategy drawing shapes.
        dtype: floating (normal × a drawn scale in {0.1, 1, 4}, or uniform in ``[low, high)`` when
            both are given), integer (uniform in ``[low or 0, high or 100)``) or ``torch.bool``.
        low: lower bound, see ``dtype``.
        high: upper bound, see ``dtype``.

    Returns:
        A strategy drawing ``torch.Tensor`` values.
    """
    st = _strategies()
    shapes = shape if isinstance(shape, st.SearchStrategy) else st.just(tuple(shape))

    @st.composite
    def tensors(draw: Callable[[Any], Any]) -> torch.Tensor:
        dims = tuple(draw(shapes))
        gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
        if dtype == torch.bool:
            return torch.rand(dims, generator=gen) < 0.5
        if not dtype.is_floating_point:
            lo, hi = int(low or 0), int(high or 100)
            return torch.randint(lo, hi, dims, generator=gen, dtype=dtype)
        if low is not None and high is not None:
            return (torch.rand(dims, generator=gen) * (high - low) + low).to(dtype)
        scale = draw(st.sampled_from([0.1, 1.0, 4.0]))
        return (torch.randn(dims, generator=gen) * scale).to(dtype)

    return tensors()


@dataclass
class Program:
    """A generated module with its example inputs and the site fields detection must report."""

    choices: Any
    module: nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    expected: dict[str, Any]

    def __repr__(self) -> str:
        return f"Program({self.choices!r})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        # hypothesis prints drawn values with this hook; keep weights and tensors out of reports
        printer.text(repr(self))


# attention grammar

PROJECTIONS = ("separate", "fused-split", "fused-chunk", "fused-unbind")
SCALE_PLACEMENTS = ("scores-mul", "scores-div", "q-mul", "split-sqrt")
MASKS = ("none", "tril-buffer", "additive-triu", "bool-where", "sdpa-causal", "window", "wide-window",
         "chunked", "band")
SCORE_MODS = ("none", "temperature", "softcap", "manual-softmax")
_EXPLICIT_MASKS = ("chunked", "band")  # no causal/window pattern: passed to the core as a tensor
HEAD_LAYOUTS = ("view-transpose", "reshape-permute", "einsum")
GQA_FORMS = ("none", "repeat-interleave", "expand-reshape")
SOFTMAX_DTYPES = ("same", "fp32-cast")
EXTRAS = ("none", "rope", "qk-norm", "both")
_GQA_PROJECTIONS = ("separate", "fused-split")  # chunk/unbind need equal q, k, v widths
_MAX_LEN = 32


@dataclass(frozen=True)
class AttentionChoices:
    """One sentence of the attention grammar (see :func:`attention_programs` for the options)."""

    projection: str = "separate"
    scale_at: str = "scores-mul"
    mask: str = "none"
    heads: str = "view-transpose"
    gqa: str = "none"
    softmax: str = "same"
    extras: str = "none"
    score_mod: str = "none"
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int = 8
    scale: float = 8**-0.5
    window: int | None = None
    bias: bool = True
    seq_len: int = 8
    batch: int = 2
    seed: int = 0

    def expected(self) -> dict[str, Any]:
        causal = self.mask not in ("none", "band")
        explicit = self.mask in _EXPLICIT_MASKS
        return {
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "value_dim": self.head_dim,
            "scale": self.scale,
            "causal": causal,
            "window": self.window if self.mask in ("window", "wide-window") else None,
            "mask": "bias" if explicit else ("causal" if causal else "none"),
            "softcap": _SOFTCAP if self.score_mod == "softcap" else None,
            "cross": False,
            "rope": self.extras in ("rope", "both"),
            "qk_norm": self.extras in ("qk-norm", "both"),
            "dropout": 0.0,
        }


_SOFTCAP = 5.0


def fixed_keep(choices: AttentionChoices, t: int, device: torch.device | None = None) -> torch.Tensor | None:
    """Bool ``[t, t]`` (True = attend) of the grammar's fixed masks, built from the length; None: none."""
    i = torch.arange(t, device=device)[:, None]
    j = torch.arange(t, device=device)[None, :]
    if choices.mask == "none":
        return None
    if choices.mask == "band":
        return (i - j).abs() < choices.window
    if choices.mask == "chunked":
        return (j <= i) & (i // choices.window == j // choices.window)
    if choices.mask in ("window", "wide-window"):
        return (j <= i) & (i - j < choices.window)
    return j <= i


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class GrammarAttention(nn.Module):
    """Self-attention spelled the way its :class:`AttentionChoices` say; ``x: [B, T, H * D]``."""

    def __init__(self, choices: AttentionChoices) -> None:
        super().__init__()
        c = self.choices = choices
        self.d_q, self.d_kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        self.n_rep, self.inv_scale = c.num_heads // c.num_kv_heads, 1.0 / c.scale
        if c.projection == "separate":
            self.q_proj = nn.Linear(self.d_q, self.d_q, bias=c.bias)
            self.k_proj = nn.Linear(self.d_q, self.d_kv, bias=c.bias)
            self.v_proj = nn.Linear(self.d_q, self.d_kv, bias=c.bias)
        else:
            self.qkv = nn.Linear(self.d_q, self.d_q + 2 * self.d_kv, bias=c.bias)
        self.o_proj = nn.Linear(self.d_q, self.d_q, bias=c.bias)
        if c.extras in ("qk-norm", "both"):
            self.q_norm, self.k_norm = (
                nn.RMSNorm(c.head_dim, eps=1e-6),
                nn.RMSNorm(c.head_dim, eps=1e-6),
            )
        if c.extras in ("rope", "both"):
            inv_freq = 1.0 / 10000 ** (torch.arange(0, c.head_dim, 2).float() / c.head_dim)
            freqs = torch.outer(torch.arange(_MAX_LEN).float(), inv_freq).repeat(1, 2)
            self.register_buffer("cos", freqs.cos(), persistent=False)
            self.register_buffer("sin", freqs.sin(), persistent=False)
        if c.mask == "tril-buffer":
            self.register_buffer("bias", torch.tril(torch.ones(_MAX_LEN, _MAX_LEN))[None, None])
        if c.score_mod == "temperature":  # XCiT / SwinV2-cr: a learned per-head factor on the scores
            self.temperature = nn.Parameter(torch.linspace(0.5, 2.0, c.num_heads).view(c.num_heads, 1, 1))

    def _project(self, x: torch.Tensor) -> Sequence[torch.Tensor]:
        c = self.choices
        if c.projection == "separate":
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        qkv = self.qkv(x)
        if c.projection == "fused-split":
            return qkv.split([self.d_q, self.d_kv, self.d_kv], dim=-1)
        if c.projection == "fused-chunk":
            return qkv.chunk(3, dim=-1)
        return qkv.reshape(x.shape[0], x.shape[1], 3, c.num_heads, c.head_dim).unbind(2)

    def _split_heads(self, y: torch.Tensor, n: int) -> torch.Tensor:
        shape = (y.shape[0], y.shape[1], n, self.choices.head_dim)
        return y.reshape(shape) if self.choices.heads == "reshape-permute" else y.view(shape)

    def _rope(self, y: torch.Tensor) -> torch.Tensor:
        t = y.shape[1]
        return y * self.cos[:t, None, :] + _rotate_half(y) * self.sin[:t, None, :]

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v as ``[B, T, heads, D]`` after qk-norm and RoPE (also read by ``reference``)."""
        c = self.choices
        q, k, v = self._project(x)
        q, k = self._split_heads(q, c.num_heads), self._split_heads(k, c.num_kv_heads)
        v = self._split_heads(v, c.num_kv_heads)
        if c.extras in ("qk-norm", "both"):
            q, k = self.q_norm(q), self.k_norm(k)
        if c.extras in ("rope", "both"):
            q, k = self._rope(q), self._rope(k)
        return q, k, v

    def _layout(self, y: torch.Tensor) -> torch.Tensor:
        if self.choices.heads == "view-transpose":
            return y.transpose(1, 2)
        if self.choices.heads == "reshape-permute":
            return y.permute(0, 2, 1, 3)
        return y

    def _repeat(self, y: torch.Tensor) -> torch.Tensor:
        form, dim = self.choices.gqa, 2 if self.choices.heads == "einsum" else 1
        if form == "repeat-interleave":
            return y.repeat_interleave(self.n_rep, dim=dim)
        if form == "expand-reshape":
            shape = list(y.shape)
            expanded = y.unsqueeze(dim + 1).expand(*shape[: dim + 1], self.n_rep, *shape[dim + 1 :])
            shape[dim] *= self.n_rep
            return expanded.reshape(shape)
        return y

    def _prescale(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.choices.scale_at == "q-mul":
            return q * self.choices.scale, k
        if self.choices.scale_at == "split-sqrt":
            root = math.sqrt(self.choices.scale)
            return q * root, k * root
        return q, k

    def _scores(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        c = self.choices
        if c.heads == "einsum":
            s = torch.einsum("bqhd,bkhd->bhqk", q, k)
        elif c.heads == "reshape-permute":
            s = torch.matmul(q, k.transpose(-1, -2))
        else:
            s = q @ k.transpose(-2, -1)
        if c.scale_at == "scores-mul":
            return s * c.scale
        if c.scale_at == "scores-div":
            return s / self.inv_scale
        return s

    def _mask(self, s: torch.Tensor) -> torch.Tensor:
        mask, t = self.choices.mask, s.shape[-1]
        if mask == "tril-buffer":
            return s.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf"))
        if mask == "additive-triu":
            return s + torch.triu(
                torch.full((t, t), float("-inf"), device=s.device, dtype=s.dtype), 1
            )
        if mask == "bool-where":
            keep = torch.ones(t, t, dtype=torch.bool, device=s.device).tril()
            return torch.where(keep, s, torch.finfo(s.dtype).min)
        if mask in ("window", "wide-window", "chunked", "band"):
            return s.masked_fill(~fixed_keep(self.choices, t, s.device), float("-inf"))
        return s

    def _modify(self, s: torch.Tensor) -> torch.Tensor:
        if self.choices.score_mod == "temperature":
            return s * self.temperature
        if self.choices.score_mod == "softcap":  # Gemma 2
            return _SOFTCAP * torch.tanh(s / _SOFTCAP)
        return s

    def _softmax(self, s: torch.Tensor) -> torch.Tensor:
        if self.choices.score_mod == "manual-softmax":
            e = (s - s.amax(dim=-1, keepdim=True)).exp()
            return e / e.sum(dim=-1, keepdim=True)
        if self.choices.softmax == "fp32-cast":
            return F.softmax(s, dim=-1, dtype=torch.float32).to(s.dtype)
        return s.softmax(dim=-1)

    def _core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention on the per-head layout; returns ``[B, T, H, D]``."""
        c = self.choices
        if c.mask == "sdpa-causal":
            if c.heads == "einsum":
                q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            scale = 1.0 if c.scale_at in ("q-mul", "split-sqrt") else c.scale
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale).transpose(
                1, 2
            )
        p = self._softmax(self._mask(self._modify(self._scores(q, k))))
        if c.heads == "einsum":
            return torch.einsum("bhqk,bkhd->bqhd", p, v)
        return (p @ v).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (self._layout(y) for y in self.heads(x))
        q, k = self._prescale(q, self._repeat(k))
        out = self._core(q, k, self._repeat(v))
        return self.o_proj(out.reshape(b, t, self.d_q))

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The same attention as one SDPA call built from ``choices.expected()``."""
        want, (b, t, _) = self.choices.expected(), x.shape
        q, k, v = (y.transpose(1, 2) for y in self.heads(x))
        keep = fixed_keep(self.choices, t)
        if self.choices.score_mod == "temperature":
            q = q * self.temperature
        gqa = want["num_kv_heads"] != want["num_heads"]
        if self.choices.score_mod == "softcap":  # no SDPA form: written out
            k, v = (y.repeat_interleave(q.shape[1] // y.shape[1], dim=1) for y in (k, v))
            s = _SOFTCAP * torch.tanh(q @ k.transpose(-2, -1) * want["scale"] / _SOFTCAP)
            s = s if keep is None else s.masked_fill(~keep, float("-inf"))
            out = s.softmax(dim=-1) @ v
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=keep, scale=want["scale"], enable_gqa=gqa
            )
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.d_q))


_WINDOWS = {"window": (2, 4), "wide-window": (13, 24), "chunked": (3, 12), "band": (3, 16)}


def attention_program(choices: AttentionChoices) -> Program:
    """Build the module and example input of one attention-grammar sentence.

    Args:
        choices: the sentence.

    Returns:
        A :class:`Program`: an eval-mode module, ``(x,)`` with ``x: [batch, seq_len, H * D]``, and
        the attention-site fields detection must report.
    """
    module = _seeded_module(lambda: GrammarAttention(choices), choices.seed)
    gen = torch.Generator().manual_seed(choices.seed)
    x = torch.randn(choices.batch, choices.seq_len, module.d_q, generator=gen)
    return Program(choices, module, (x,), choices.expected())


def _options(name: str, given: Sequence[str], allowed: Sequence[str]) -> list[str]:
    unknown = sorted(set(given) - set(allowed))
    if unknown or not given:
        raise ValueError(f"{name} must be a non-empty subset of {list(allowed)}, got {list(given)}")
    return list(given)


def attention_programs(
    *,
    projections: Sequence[str] = PROJECTIONS,
    scale_placements: Sequence[str] = SCALE_PLACEMENTS,
    masks: Sequence[str] = MASKS,
    head_layouts: Sequence[str] = HEAD_LAYOUTS,
    gqa: Sequence[str] = GQA_FORMS,
    softmax_dtypes: Sequence[str] = SOFTMAX_DTYPES,
    extras: Sequence[str] = EXTRAS,
    score_mods: Sequence[str] = ("none",),
) -> SearchStrategy[Program]:
    """A hypothesis strategy for single-attention modules drawn from a grammar of spellings.

    Each keyword restricts one axis of the grammar (defaults: every option):

    * ``projections``: ``separate`` q/k/v Linears, or one fused Linear cut by ``fused-split``,
      ``fused-chunk`` or ``fused-unbind`` (reshape to ``[B, T, 3, H, D]`` then ``unbind``).
    * ``scale_placements``: ``scores-mul``, ``scores-div`` (by ``1/scale``), ``q-mul`` (q scaled
      before the product) or ``split-sqrt`` (√scale on q and on k).
    * ``masks``: ``none``, ``tril-buffer`` (sliced registered tril + ``masked_fill``),
      ``additive-triu`` (``triu(-inf)`` added), ``bool-where`` (``torch.where`` with ``finfo.min``),
      ``sdpa-causal`` (``F.scaled_dot_product_attention(is_causal=True)``) or ``window`` (causal
      sliding window).
    * ``head_layouts``: ``view-transpose`` with ``@``, ``reshape-permute`` with ``torch.matmul``, or
      ``einsum`` (``bqhd,bkhd->bhqk``, heads never transposed).
    * ``gqa``: ``none``, ``repeat-interleave`` or ``expand-reshape`` (GQA and MQA; only with the
      ``separate`` and ``fused-split`` projections).
    * ``softmax_dtypes``: ``same`` or ``fp32-cast`` (softmax in float32, cast back).
    * ``extras``: ``none``, ``rope`` (half-split RoPE), ``qk-norm`` (per-head RMSNorm) or ``both``.
    * ``score_mods`` (default ``none`` only): ``temperature`` (a learned per-head ``[H, 1, 1]``
      factor), ``softcap`` (Gemma 2's ``c·tanh(s/c)``, which ``"sdpa"`` refuses) or
      ``manual-softmax`` (``exp(s - max) / sum``, not detected yet).

    Masks ``wide-window`` (a window wider than the example), ``chunked`` (chunk-local causal) and
    ``band`` (``|i - j| < w``) look like plain causal or no mask at some lengths only.

    Sizes (heads, kv heads, head dim, scale, window, batch, length, bias, seed) are drawn too.

    Returns:
        A strategy drawing :class:`Program` values (``.module``, ``.example_inputs``,
        ``.expected``).

    Raises:
        ValueError: an option is unknown or an axis is empty.
    """
    st = _strategies()
    axes = {
        "projections": _options("projections", projections, PROJECTIONS),
        "scale_placements": _options("scale_placements", scale_placements, SCALE_PLACEMENTS),
        "masks": _options("masks", masks, MASKS),
        "head_layouts": _options("head_layouts", head_layouts, HEAD_LAYOUTS),
        "gqa": _options("gqa", gqa, GQA_FORMS),
        "softmax_dtypes": _options("softmax_dtypes", softmax_dtypes, SOFTMAX_DTYPES),
        "extras": _options("extras", extras, EXTRAS),
        "score_mods": _options("score_mods", score_mods, SCORE_MODS),
    }
    if "none" not in axes["gqa"]:
        axes["projections"] = [p for p in axes["projections"] if p in _GQA_PROJECTIONS]
        if not axes["projections"]:
            raise ValueError(f"GQA forms need one of the projections {list(_GQA_PROJECTIONS)}")

    @st.composite
    def programs(draw: Callable[[Any], Any]) -> Program:
        pick = lambda axis: draw(st.sampled_from(axes[axis]))
        projection = pick("projections")
        gqa_forms = [g for g in axes["gqa"] if g == "none" or projection in _GQA_PROJECTIONS]
        gqa_form = draw(st.sampled_from(gqa_forms))
        num_heads = draw(st.sampled_from([2, 4]))
        kv_options = [n for n in (1, 2) if n < num_heads] if gqa_form != "none" else [num_heads]
        head_dim = draw(st.sampled_from([4, 8, 16]))
        mask = pick("masks")
        choices = AttentionChoices(
            projection=projection,
            scale_at=pick("scale_placements"),
            mask=mask,
            heads=pick("head_layouts"),
            gqa=gqa_form,
            softmax=pick("softmax_dtypes"),
            extras=pick("extras"),
            score_mod=pick("score_mods") if mask != "sdpa-causal" else "none",
            num_heads=num_heads,
            num_kv_heads=draw(st.sampled_from(kv_options)),
            head_dim=head_dim,
            scale=draw(st.sampled_from([head_dim**-0.5, 0.1, 0.3])),
            window=draw(st.integers(*_WINDOWS[mask])) if mask in _WINDOWS else None,
            bias=draw(st.booleans()),
            seq_len=draw(st.integers(5, 12)),
            batch=draw(st.integers(1, 2)),
            seed=draw(st.integers(0, 2**16)),
        )
        return attention_program(choices)

    return programs()


# FFN grammar

FFN_ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")
FFN_SPELLINGS = ("module", "functional", "manual")
FFN_GATINGS = ("none", "separate", "fused-chunk")

_ACT_MODULES: dict[str, Callable[[], nn.Module]] = {
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu": nn.ReLU,
    "silu": nn.SiLU,
}
_ACT_FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}
_ACT_MANUAL: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": lambda x: 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0))),
    "gelu_tanh": lambda x: (
        0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    ),
    "relu": torch.relu,
    "silu": lambda x: x * torch.sigmoid(x),
}


@dataclass(frozen=True)
class FFNChoices:
    """One sentence of the FFN grammar (see :func:`ffn_programs` for the options)."""

    activation: str = "gelu"
    spelling: str = "module"
    gating: str = "none"
    gate_first: bool = True
    sequential: bool = False
    bias: bool = True
    model_dim: int = 16
    hidden_size: int = 32
    seq_len: int = 8
    batch: int = 2
    seed: int = 0

    def expected(self) -> dict[str, Any]:
        return {
            "activation": self.activation,
            "gated": self.gating != "none",
            "hidden_size": self.hidden_size,
            "model_dim": self.model_dim,
        }


class GrammarFFN(nn.Module):
    """A feed-forward block spelled the way its :class:`FFNChoices` say."""

    def __init__(self, choices: FFNChoices) -> None:
        super().__init__()
        c = self.choices = choices
        d, f = c.model_dim, c.hidden_size
        if c.sequential:
            act = _ACT_MODULES[c.activation]()
            self.net = nn.Sequential(
                nn.Linear(d, f, bias=c.bias), act, nn.Linear(f, d, bias=c.bias)
            )
            return
        if c.gating == "fused-chunk":
            self.gate_up = nn.Linear(d, 2 * f, bias=c.bias)
        else:
            self.up = nn.Linear(d, f, bias=c.bias)
        if c.gating == "separate":
            self.gate = nn.Linear(d, f, bias=c.bias)
        self.down = nn.Linear(f, d, bias=c.bias)
        if c.spelling == "module":
            self.act = _ACT_MODULES[c.activation]()
        else:
            self.act_fn = (_ACT_FUNCTIONS if c.spelling == "functional" else _ACT_MANUAL)[
                c.activation
            ]

    def _act(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x) if self.choices.spelling == "module" else self.act_fn(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.choices
        if c.sequential:
            return self.net(x)
        if c.gating == "none":
            return self.down(self._act(self.up(x)))
        if c.gating == "separate":
            return self.down(self._act(self.gate(x)) * self.up(x))
        first, second = self.gate_up(x).chunk(2, dim=-1)
        gate, up = (first, second) if c.gate_first else (second, first)
        return self.down(self._act(gate) * up)

    def _weights(self) -> dict[str, tuple[torch.Tensor, torch.Tensor | None] | None]:
        """``(weight, bias)`` of the up, gate (``None`` when ungated) and down projections."""
        c, lin = self.choices, lambda m: (m.weight, m.bias)
        if c.sequential:
            return {"up": lin(self.net[0]), "gate": None, "down": lin(self.net[2])}
        if c.gating != "fused-chunk":
            gate = lin(self.gate) if c.gating == "separate" else None
            return {"up": lin(self.up), "gate": gate, "down": lin(self.down)}
        w, b, f = self.gate_up.weight, self.gate_up.bias, c.hidden_size
        halves = [(w[:f], None if b is None else b[:f]), (w[f:], None if b is None else b[f:])]
        gate, up = halves if c.gate_first else halves[::-1]
        return {"up": up, "gate": gate, "down": lin(self.down)}

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The same FFN from plain ``F.linear`` calls and the canonical activation."""
        w, act = self._weights(), _ACT_FUNCTIONS[self.choices.activation]
        if w["gate"] is None:
            hidden = act(F.linear(x, *w["up"]))
        else:
            hidden = act(F.linear(x, *w["gate"])) * F.linear(x, *w["up"])
        return F.linear(hidden, *w["down"])


def ffn_program(choices: FFNChoices) -> Program:
    """Build the module and example input of one FFN-grammar sentence.

    Args:
        choices: the sentence.

    Returns:
        A :class:`Program`: an eval-mode module, ``(x,)`` with ``x: [batch, seq_len, model_dim]``,
        and the FFN-site fields detection must report.
    """
    module = _seeded_module(lambda: GrammarFFN(choices), choices.seed)
    gen = torch.Generator().manual_seed(choices.seed)
    x = torch.randn(choices.batch, choices.seq_len, choices.model_dim, generator=gen)
    return Program(choices, module, (x,), choices.expected())


def ffn_programs(
    *,
    activations: Sequence[str] = FFN_ACTIVATIONS,
    spellings: Sequence[str] = FFN_SPELLINGS,
    gatings: Sequence[str] = FFN_GATINGS,
) -> SearchStrategy[Program]:
    """A hypothesis strategy for single-FFN modules drawn from a grammar of spellings.

    * ``activations``: ``gelu``, ``gelu_tanh``, ``relu``, ``silu``.
    * ``spellings``: ``module`` (``nn.GELU()`` ...), ``functional`` (``F.gelu`` ...) or ``manual``
      (the erf / GPT-2 tanh formulas, ``x * sigmoid(x)``, ``torch.relu``).
    * ``gatings``: ``none`` (``down(act(up x))``, sometimes as an ``nn.Sequential``), ``separate``
      gate and up Linears, or one ``fused-chunk`` Linear with the activated half first or second.

    Model dim, hidden size, bias, batch, length and seed are drawn too.

    Returns:
        A strategy drawing :class:`Program` values (``.module``, ``.example_inputs``,
        ``.expected``).

    Raises:
        ValueError: an option is unknown or an axis is empty.
    """
    st = _strategies()
    acts = _options("activations", activations, FFN_ACTIVATIONS)
    spells = _options("spellings", spellings, FFN_SPELLINGS)
    gates = _options("gatings", gatings, FFN_GATINGS)

    @st.composite
    def programs(draw: Callable[[Any], Any]) -> Program:
        spelling, gating = draw(st.sampled_from(spells)), draw(st.sampled_from(gates))
        sequential = spelling == "module" and gating == "none" and draw(st.booleans())
        choices = FFNChoices(
            activation=draw(st.sampled_from(acts)),
            spelling=spelling,
            gating=gating,
            gate_first=draw(st.booleans()),
            sequential=sequential,
            bias=draw(st.booleans()),
            model_dim=draw(st.sampled_from([8, 16, 24])),
            hidden_size=draw(st.sampled_from([16, 32, 48])),
            seq_len=draw(st.integers(3, 10)),
            batch=draw(st.integers(1, 2)),
            seed=draw(st.integers(0, 2**16)),
        )
        return ffn_program(choices)

    return programs()
