"""Public API behaviour beyond the zoo: reports, filters, dry runs, dynamic shapes, HF FFN swaps."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import swapformer
from swapformer.errors import ConfigError, InputError

warnings.filterwarnings("ignore", category=FutureWarning)


class CausalBlock(nn.Module):
    """nanoGPT-style manual attention plus a GELU MLP."""

    def __init__(self, d: int = 32, heads: int = 4, max_len: int = 64) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)
        self.register_buffer("tril", torch.tril(torch.ones(max_len, max_len)).view(1, 1, max_len, max_len))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.tril[:, :, :t, :t] == 0, float("-inf")).softmax(dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, t, c))
        return x + self.down(F.gelu(self.up(x)))


class DropoutBlock(CausalBlock):
    """CausalBlock with dropout on the attention probabilities and on the block output."""

    def __init__(self) -> None:
        super().__init__()
        self.attn_drop = nn.Dropout(0.3)
        self.out_drop = nn.Dropout(0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = self.attn_drop(att.masked_fill(self.tril[:, :, :t, :t] == 0, float("-inf")).softmax(dim=-1))
        x = x + self.out_drop(self.proj((att @ v).transpose(1, 2).reshape(b, t, c)))
        return x + self.down(F.gelu(self.up(x)))


@pytest.fixture
def block() -> CausalBlock:
    torch.manual_seed(0)
    return CausalBlock().eval()


def test_sites_describe_the_block(block: CausalBlock) -> None:
    sites = swapformer.find_sites(block, torch.randn(2, 8, 32), kinds=("attention", "ffn"))
    attn, ffn = [s for s in sites if s.kind == "attention"], [s for s in sites if s.kind == "ffn"]
    assert len(attn) == 1 and len(ffn) == 1
    a = attn[0]
    assert (a.num_heads, a.num_kv_heads, a.head_dim, a.causal, a.mask) == (4, 4, 8, True, "causal")
    assert a.scale == pytest.approx(8**-0.5)
    assert a.q_proj.weight == "qkv.weight" and a.q_proj.rows == (0, 32) and a.v_proj.rows == (64, 96)
    assert a.o_proj.weight == "proj.weight"
    assert (ffn[0].activation, ffn[0].gated, ffn[0].hidden_size) == ("gelu", False, 128)


def test_rewrite_keeps_dynamic_shapes_and_the_input_model(block: CausalBlock) -> None:
    before = {k: v.clone() for k, v in block.state_dict().items()}
    out = swapformer.rewrite(block, "sdpa", example_inputs=torch.randn(2, 8, 32), kinds=("attention", "ffn"))
    assert len(out.swapformer_report.replaced) == 2
    x = torch.randn(3, 13, 32)  # other batch and length than captured
    torch.testing.assert_close(out(x), block(x), rtol=1e-5, atol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in block.state_dict().items())
    assert not any(isinstance(m, swapformer.targets.TargetModule) for m in block.modules())
    # the rewritten model owns copies: training it cannot touch the user's weights
    assert all(p.data_ptr() != q.data_ptr() for p in out.parameters() for q in block.parameters())


def test_explain_is_a_dry_run_with_a_table(block: CausalBlock) -> None:
    report = swapformer.explain(block, "sdpa", torch.randn(2, 8, 32), kinds=("attention", "ffn"))
    assert report.dry_run and len(report.replaced) == 2
    text = str(report)
    assert "would replace" in text and "export-dynamic" in text
    json.dumps(report.to_dict(), default=str)  # serialisable for the CLI and zoo reports


def test_filter_fn_skips_with_a_reason(block: CausalBlock) -> None:
    out = swapformer.rewrite(block, "sdpa", example_inputs=torch.randn(2, 8, 32), kinds=("attention", "ffn"),
                             filter_fn=lambda site: site.kind == "ffn")
    report = out.swapformer_report
    assert [r.site.kind for r in report.replaced] == ["ffn"]
    assert [s.reason for s in report.skipped] == ["excluded by filter_fn"]


def test_bad_kinds_and_options_are_named(block: CausalBlock) -> None:
    with pytest.raises(InputError, match="unknown site kind"):
        swapformer.find_sites(block, torch.randn(2, 8, 32), kinds=("mlp",))
    with pytest.raises(ConfigError, match="no option"):
        swapformer.rewrite(block, "sdpa", example_inputs=torch.randn(2, 8, 32), chunk=3)
    with pytest.raises(InputError, match="example_inputs are required"):
        swapformer.find_sites(block)


def test_multihead_attention_with_returned_weights() -> None:
    mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    x = torch.randn(2, 8, 32)
    out = swapformer.rewrite(mha, "sdpa", example_inputs=(x, x, x))
    site = out.swapformer_report.replaced[0].site
    assert (site.num_heads, site.head_dim, site.q_proj.weight) == (4, 8, "in_proj_weight")
    assert site.notes  # the averaged weights it returns still need the probabilities
    for a, b in zip(out(x, x, x), mha(x, x, x)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_hf_llama_attention_and_ffn_swap() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    out = swapformer.rewrite(model, "sdpa", kinds=("attention", "ffn"))
    assert type(out) is type(model)
    assert model.config._attn_implementation == "sdpa"  # the original is untouched
    names = {r.core_name for r in out.swapformer_report.replaced}
    assert names == {f"model.layers.{i}.{p}" for i in range(2) for p in ("self_attn.swapformer_core", "mlp.core")}
    ids = torch.randint(0, 100, (2, 12))
    torch.testing.assert_close(out(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    gen = dict(max_new_tokens=4, do_sample=False)
    assert torch.equal(out.generate(ids[:1, :5], **gen), model.generate(ids[:1, :5], **gen))


def test_hf_ffn_spanning_modules_is_skipped_with_reason() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                     num_attention_heads=4, vocab_size=100)
    out = swapformer.rewrite(transformers.BertModel(config).eval(), "sdpa", kinds=("attention", "ffn"))
    (skip,) = out.swapformer_report.skipped
    assert skip.site.kind == "ffn" and "not a whole module" in skip.reason


def test_prepare_once_rewrite_many(block: CausalBlock) -> None:
    prepared = swapformer.prepare(block, torch.randn(2, 8, 32), kinds=("attention", "ffn"))
    assert [s.kind for s in prepared.sites] == ["attention", "ffn"]
    both = prepared.rewrite("sdpa")
    only_ffn = prepared.rewrite("sdpa", filter_fn=lambda s: s.kind == "ffn")
    assert len(both.swapformer_report.replaced) == 2 and len(only_ffn.swapformer_report.replaced) == 1
    assert both is not only_ffn and prepared.explain("sdpa").dry_run
    x = torch.randn(1, 5, 32)
    torch.testing.assert_close(both(x), only_ffn(x), rtol=1e-5, atol=1e-5)


class InPlaceBiasAttention(nn.Module):
    """Scores edited in place after the product (MViTv2's relative positions): dataflow alone would lie."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        att = q @ k.transpose(-2, -1)
        att[:, :, 1:, 1:] = att[:, :, 1:, 1:] + 1.0
        return att.softmax(dim=-1) @ v


def test_scores_modified_in_place_are_not_claimed() -> None:
    q, k, v = (torch.randn(1, 2, 5, 4) for _ in range(3))
    model = InPlaceBiasAttention().eval()
    report = swapformer.explain(model, "sdpa", (q, k, v))
    assert not report.sites
    out = swapformer.rewrite(model, "sdpa", example_inputs=(q, k, v))
    torch.testing.assert_close(out(q, k, v), model(q, k, v))


# options, defaults and RNG


def test_config_instance_with_unknown_option_is_a_config_error() -> None:
    from swapformer.targets.window import WindowConfig

    with pytest.raises(ConfigError, match=r"no option\(s\) \['windw'\]; its options are .*'sinks'.*'window'"):
        swapformer.targets.resolve_target(WindowConfig(), windw=3)
    assert swapformer.targets.resolve_target(WindowConfig(), window=3).window == 3


@pytest.mark.parametrize("options, message", [
    (dict(window=2.5), r"'window' must be an int, got 2\.5"),
    (dict(sinks=True), r"'sinks' must be an int, got True"),
    (dict(window="8"), r"'window' must be an int, got '8'"),
])
def test_window_options_are_type_checked(options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        swapformer.targets.resolve_target("window", **options)


def test_every_registered_config_checks_its_field_types() -> None:
    """Each config subclass must run TargetConfig.__post_init__: a wrong type is refused for every field."""
    import dataclasses
    import typing

    for name in swapformer.available_targets():
        cls = type(swapformer.targets.resolve_target(name))
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            with pytest.raises(ConfigError, match=repr(field.name)):
                cls(**{field.name: object()})
            if hints[field.name] is float:  # ints are accepted for floats, and stored as floats
                value = getattr(cls(**{field.name: 1}), field.name)
                assert type(value) is float and value == 1.0


def test_literal_options_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"'mode' must be one of 'retrofit', 'layer', got 'fast'"):
        swapformer.targets.resolve_target("cat", mode="fast")
    with pytest.raises(ConfigError, match="'feature_map' must be one of"):
        swapformer.targets.resolve_target("fastweight", feature_map=1)


def test_every_verb_defaults_to_attention_sites(block: CausalBlock) -> None:
    import inspect

    from swapformer.rewriter import api

    x = torch.randn(2, 8, 32)
    for verb in (swapformer.find_sites, swapformer.prepare, swapformer.explain, swapformer.rewrite):
        assert inspect.signature(verb).parameters["kinds"].default == ("attention",), verb.__name__
    assert api.DEFAULT_KINDS == ("attention",)
    assert [s.kind for s in swapformer.find_sites(block, x)] == ["attention"]
    assert [s.kind for s in swapformer.prepare(block, x).sites] == ["attention"]
    assert [r.site.kind for r in swapformer.explain(block, "sdpa", x).replaced] == ["attention"]
    assert [r.site.kind for r in swapformer.rewrite(block, "sdpa", example_inputs=x).swapformer_report.replaced] == [
        "attention"]


def test_rewrite_leaves_the_global_rng_alone_and_is_reproducible(block: CausalBlock) -> None:
    x = torch.randn(2, 8, 32)
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    # the window-free form: its gate biases are drawn at random (the hybrid's init is deterministic)
    first = swapformer.rewrite(block, "fastweight", example_inputs=x, verify=False, local_window=0)
    assert torch.equal(torch.get_rng_state(), state)
    again = swapformer.rewrite(block, "fastweight", example_inputs=x, verify=False, local_window=0)
    other = swapformer.rewrite(block, "fastweight", example_inputs=x, verify=False, seed=1, local_window=0)
    new = [n for n, _ in first.named_parameters() if "swapformer_cores" in n]
    params = lambda m: dict(m.named_parameters())
    assert new and all(torch.equal(params(first)[n], params(again)[n]) for n in new)
    assert not all(torch.equal(params(first)[n], params(other)[n]) for n in new)
    assert torch.equal(torch.get_rng_state(), state)


def test_rewrite_of_a_model_in_training_mode_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(0)
    model, x = DropoutBlock().train(), torch.randn(2, 8, 32)
    state = torch.get_rng_state()
    swapformer.rewrite(model, "window", example_inputs=x, window=4)
    assert torch.equal(torch.get_rng_state(), state)
