"""Hugging Face transformers v5 models from tiny random configs: detection, exact rewrite, generate.

Every architecture is built from its config class (no download) with both ``"eager"`` and ``"sdpa"``
attention. The expected site fields are derived from the same constants as the configs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch

import swapformer
from swapformer.testing import assert_same_outputs

transformers = pytest.importorskip("transformers")

HIDDEN, LAYERS, HEADS, KV_HEADS, VOCAB = 64, 2, 4, 2, 1000
HEAD_DIM = HIDDEN // HEADS
FFN, MAX_POS = 2 * HIDDEN, 64
BATCH, SEQ, DECODER_SEQ = 2, 16, 8
WINDOW = 4  # Mistral's sliding window: visible at SEQ = 16
IMPLS = ("eager", "sdpa")


def _fields(*, kv: int = HEADS, causal: bool = True, rope: bool = False, **kw: Any) -> dict[str, Any]:
    fields = {
        "num_heads": HEADS,
        "num_kv_heads": kv,
        "head_dim": HEAD_DIM,
        "scale": HEAD_DIM**-0.5,
        "causal": causal,
        "cross": False,
        "rope": rope,
        "window": None,
    }
    return {**fields, **kw}


@dataclass(frozen=True)
class HFCase:
    """One architecture: its model class, a tiny config, and the attention sites it must show.

    ``sites`` holds ``(count, fields)`` groups: exactly ``count`` sites must carry ``fields``.
    """

    name: str
    model_class: str
    make_config: Callable[[], Any]
    sites: tuple[tuple[int, dict[str, Any]], ...]
    inputs: str = "text"  # "text", "padded-text", "seq2seq" or "image"
    generates: bool = True
    slow_eager: bool = False


def _decoder_lm(**config: Any) -> dict[str, Any]:
    return {
        "hidden_size": HIDDEN,
        "intermediate_size": FFN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "vocab_size": VOCAB,
        "max_position_embeddings": MAX_POS,
        **config,
    }


def _config(name: str, **kw: Any) -> Callable[[], Any]:
    return lambda: getattr(transformers, name)(**kw)


def _cases() -> list[HFCase]:
    gqa = {"num_key_value_heads": KV_HEADS}
    llama_like = ((LAYERS, _fields(kv=KV_HEADS, rope=True)),)
    return [
        HFCase(
            "gpt2",
            "GPT2LMHeadModel",
            _config(
                "GPT2Config", n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, vocab_size=VOCAB,
                n_positions=MAX_POS, bos_token_id=0, eos_token_id=0,
                attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
            ),
            ((LAYERS, _fields()),),
        ),
        HFCase("llama", "LlamaForCausalLM", _config("LlamaConfig", **_decoder_lm(**gqa)), llama_like),
        HFCase(
            "mistral",
            "MistralForCausalLM",
            _config("MistralConfig", **_decoder_lm(**gqa, head_dim=HEAD_DIM, sliding_window=WINDOW)),
            ((LAYERS, _fields(kv=KV_HEADS, rope=True, window=WINDOW)),),
            slow_eager=True,
        ),
        HFCase(
            "qwen2", "Qwen2ForCausalLM", _config("Qwen2Config", **_decoder_lm(**gqa)), llama_like,
            slow_eager=True,
        ),
        HFCase(
            "phi", "PhiForCausalLM", _config("PhiConfig", **_decoder_lm(**gqa)), llama_like,
            slow_eager=True,
        ),
        HFCase(
            "phi3",
            "Phi3ForCausalLM",
            _config("Phi3Config", **_decoder_lm(**gqa, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
            llama_like,
            slow_eager=True,
        ),
        HFCase(
            "gpt_neox",
            "GPTNeoXForCausalLM",
            _config("GPTNeoXConfig", **_decoder_lm()),
            ((LAYERS, _fields(rope=True)),),
            slow_eager=True,
        ),
        HFCase(
            "opt",
            "OPTForCausalLM",
            _config(
                "OPTConfig", hidden_size=HIDDEN, ffn_dim=FFN, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, vocab_size=VOCAB, max_position_embeddings=MAX_POS,
                word_embed_proj_dim=HIDDEN,
            ),
            ((LAYERS, _fields()),),
            slow_eager=True,
        ),
        HFCase(
            "bert",
            "BertModel",
            _config(
                "BertConfig", **_decoder_lm(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
            ),
            ((LAYERS, _fields(causal=False)),),
            inputs="padded-text",
            generates=False,
        ),
        HFCase(
            "t5",
            "T5ForConditionalGeneration",
            _config(
                "T5Config", d_model=HIDDEN, d_kv=HEAD_DIM, d_ff=FFN, num_layers=LAYERS,
                num_decoder_layers=LAYERS, num_heads=HEADS, vocab_size=VOCAB, dropout_rate=0.0,
                decoder_start_token_id=0,
            ),
            (
                (LAYERS, _fields(causal=False, scale=1.0)),  # encoder self-attention
                (LAYERS, _fields(causal=True, scale=1.0)),  # decoder self-attention
                (LAYERS, _fields(causal=False, cross=True, scale=1.0)),  # decoder cross-attention
            ),
            inputs="seq2seq",
            slow_eager=True,
        ),
        HFCase(
            "vit",
            "ViTModel",
            _config(
                "ViTConfig", hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, image_size=32, patch_size=8,
            ),
            ((LAYERS, _fields(causal=False)),),
            inputs="image",
            generates=False,
            slow_eager=True,
        ),
    ]  # fmt: skip


CASES = {case.name: case for case in _cases()}


def _params(cases: list[HFCase]) -> list[Any]:
    params = []
    for case in cases:
        for impl in IMPLS:
            slow = impl == "eager" and case.slow_eager
            marks = (pytest.mark.slow,) if slow else ()
            params.append(pytest.param(case.name, impl, marks=marks, id=f"{case.name}-{impl}"))
    return params


ALL = _params(list(CASES.values()))
GENERATING = _params([case for case in CASES.values() if case.generates])


def _tokens(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def _inputs(case: HFCase) -> dict[str, torch.Tensor]:
    if case.inputs == "image":
        return {"pixel_values": torch.randn(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(0))}
    ids = _tokens(BATCH, SEQ)
    mask = torch.ones_like(ids)
    if case.inputs == "padded-text":
        mask[1, -4:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    if case.inputs == "seq2seq":
        inputs["decoder_input_ids"] = _tokens(BATCH, DECODER_SEQ, seed=1)
    return inputs


@functools.cache
def _model(name: str, impl: str) -> torch.nn.Module:
    case = CASES[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model_class = getattr(transformers, case.model_class)
        model = model_class._from_config(case.make_config(), attn_implementation=impl)
    return model.eval()


@functools.cache
def _rewritten(name: str, impl: str) -> torch.nn.Module:
    return swapformer.rewrite(_model(name, impl), "sdpa", example_inputs=_inputs(CASES[name]))


def _matching(sites: list[Any], fields: dict[str, Any]) -> list[Any]:
    def matches(site: Any) -> bool:
        for key, want in fields.items():
            got = getattr(site, key)
            if isinstance(want, float) and not isinstance(got, bool):
                if abs(got - want) > 1e-6 * abs(want):
                    return False
            elif got != want:
                return False
        return True

    return [site for site in sites if matches(site)]


@pytest.mark.parametrize(("name", "impl"), ALL)
def test_attention_sites_per_layer_and_kind(name: str, impl: str) -> None:
    case = CASES[name]
    sites = swapformer.find_sites(_model(name, impl), _inputs(case), kinds=("attention",))
    described = "\n".join(f"  {s.name}: {s}" for s in sites)
    assert len(sites) == sum(count for count, _ in case.sites), described
    for count, fields in case.sites:
        assert len(_matching(sites, fields)) == count, f"want {count} sites with {fields}:\n{described}"


@pytest.mark.parametrize(("name", "impl"), ALL)
def test_sdpa_rewrite_keeps_class_and_outputs(name: str, impl: str) -> None:
    model, rewritten = _model(name, impl), _rewritten(name, impl)
    report = rewritten.swapformer_report
    assert type(rewritten) is type(model)
    assert len(report.replaced) == sum(count for count, _ in CASES[name].sites), str(report)
    assert_same_outputs(model, rewritten, _inputs(CASES[name]), rtol=1e-5, report=report)


@pytest.mark.parametrize(("name", "impl"), GENERATING)
def test_generate_gives_the_same_tokens(name: str, impl: str) -> None:
    ids = _tokens(BATCH, SEQ, seed=2)
    options = {"attention_mask": torch.ones_like(ids), "max_new_tokens": 5, "do_sample": False}
    options["pad_token_id"] = 0
    with torch.no_grad():
        expected = _model(name, impl).generate(ids, **options)
        actual = _rewritten(name, impl).generate(ids, **options)
    assert torch.equal(actual, expected)
