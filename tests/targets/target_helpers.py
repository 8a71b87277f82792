"""Hand-built sites, random host weights and decoding drivers shared by the target tests."""

from __future__ import annotations

import torch

from swapformer.sites import AttentionSite, FFNSite, ProjectionRef
from swapformer.targets.base import core_class, resolve_target

ATTENTION_TARGETS = ("fastweight", "elita", "cat", "window", "worker")


def attention_site(
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 8,
    d_model: int = 24,
    *,
    causal: bool = True,
    cross: bool = False,
    qkv_bias: bool = False,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> tuple[AttentionSite, dict[str, torch.Tensor]]:
    """A Llama-like attention site named ``layer`` and random weights for its projections."""
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "q": (num_heads * head_dim, d_model),
        "k": (num_kv_heads * head_dim, d_model),
        "v": (num_kv_heads * head_dim, d_model),
        "o": (d_model, num_heads * head_dim),
    }
    weights: dict[str, torch.Tensor] = {}
    refs: dict[str, ProjectionRef] = {}
    for name, shape in shapes.items():
        weights[f"layer.{name}_proj.weight"] = torch.randn(*shape, generator=g, dtype=dtype) / shape[1] ** 0.5
        bias = None
        if qkv_bias and name != "o":
            bias = f"layer.{name}_proj.bias"
            weights[bias] = torch.randn(shape[0], generator=g, dtype=dtype)
        refs[name] = ProjectionRef(weight=f"layer.{name}_proj.weight", bias=bias)
    site = AttentionSite(
        kind="attention", name="layer:0", module="layer", module_type="LlamaAttention",
        num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, value_dim=head_dim,
        scale=head_dim**-0.5, causal=causal, mask="causal" if causal else "none", cross=cross,
        rope=True, q_proj=refs["q"], k_proj=refs["k"], v_proj=refs["v"], o_proj=refs["o"],
        form="sdpa",
    )
    return site, weights


def ffn_site(
    d_model: int = 12,
    hidden_size: int = 20,
    activation: str = "silu",
    gated: bool = False,
    *,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> tuple[FFNSite, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    w = {
        "mlp.up.weight": torch.randn(hidden_size, d_model, generator=g, dtype=dtype) / d_model**0.5,
        "mlp.up.bias": torch.randn(hidden_size, generator=g, dtype=dtype),
        "mlp.down.weight": torch.randn(d_model, hidden_size, generator=g, dtype=dtype) / hidden_size**0.5,
        "mlp.down.bias": torch.randn(d_model, generator=g, dtype=dtype),
    }
    gate = None
    if gated:
        w["mlp.gate.weight"] = torch.randn(hidden_size, d_model, generator=g, dtype=dtype) / d_model**0.5
        w["mlp.gate.bias"] = torch.randn(hidden_size, generator=g, dtype=dtype)
        gate = ProjectionRef("mlp.gate.weight", "mlp.gate.bias")
    site = FFNSite(
        kind="ffn", name="mlp:0", module="mlp", module_type="MLP", activation=activation,
        gated=gated, hidden_size=hidden_size, model_dim=d_model,
        up_proj=ProjectionRef("mlp.up.weight", "mlp.up.bias"), gate_proj=gate,
        down_proj=ProjectionRef("mlp.down.weight", "mlp.down.bias"), form="mlp",
    )
    return site, w


def build(target: str, site, weights, kind: str = "attention", **options):
    """``from_site`` through the registry, in the weights' dtype, eval mode."""
    config = resolve_target(target, **options)
    cls = core_class(config, kind)
    assert cls is not None, (target, kind)
    dtype = next(iter(weights.values())).dtype
    return cls.from_site(site, config, weights).to(dtype).eval()


def randomize(core: torch.nn.Module, seed: int = 1, std: float = 0.3) -> torch.nn.Module:
    """Move every new parameter away from its (often degenerate) start."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in core.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return core


def qkv_inputs(site: AttentionSite, batch: int, length: int, d_model: int, *, seed: int = 0,
               dtype: torch.dtype = torch.float64):
    """Random post-RoPE ``q, k, v`` ``[B, H, T, D]`` and ``hidden`` ``[B, T, d_model]``."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, site.num_heads, length, site.head_dim, generator=g, dtype=dtype)
    k = torch.randn(batch, site.num_kv_heads, length, site.head_dim, generator=g, dtype=dtype)
    v = torch.randn(batch, site.num_kv_heads, length, site.head_dim, generator=g, dtype=dtype)
    hidden = torch.randn(batch, length, d_model, generator=g, dtype=dtype)
    return q, k, v, hidden


def decode(core, q, k, v, hidden, prefill: int, step: int = 1) -> torch.Tensor:
    """Prefill ``prefill`` tokens with a fresh state, then feed the rest ``step`` tokens at a time."""
    state: dict = {}
    t = q.shape[-2]
    outs = []
    bounds = [0, prefill] if prefill else [0]
    bounds += list(range(prefill + step, t, step)) + [t]
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e > s:
            outs.append(core(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], hidden=hidden[:, s:e], state=state))
    return torch.cat(outs, dim=2)


def padding_bias(lengths: list[int], total: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """HF-style additive causal + right-padding mask ``[B, 1, T, T]`` (``finfo.min`` where masked)."""
    i = torch.arange(total)[:, None]
    j = torch.arange(total)[None, :]
    real = torch.arange(total)[None, :] < torch.tensor(lengths)[:, None]  # [B, T]
    keep = (j <= i)[None] & real[:, None, :]
    bias = torch.zeros(len(lengths), 1, total, total, dtype=dtype)
    return bias.masked_fill(~keep[:, None], torch.finfo(dtype).min)


def hypothesis_settings(max_examples: int = 12):
    """Derandomized, deadline-free hypothesis settings (tests stay fast and reproducible)."""
    from hypothesis import HealthCheck, settings

    return settings(max_examples=max_examples, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


def assert_same_decode(outs, states, want_outs, want_states, tol: float = 1e-10) -> None:
    """Outputs and decoding states (dicts of tensors and plain values) equal call by call."""
    for got, want in zip(outs, want_outs, strict=True):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    for got, want in zip(states, want_states, strict=True):
        assert got.keys() == want.keys()
        for name, value in got.items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(value, want[name], rtol=tol, atol=tol)
            else:
                assert value == want[name]
