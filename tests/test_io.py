"""Save / load round trips of rewritten models: plain (GraphModule) and Hugging Face, exact outputs.

Every round trip perturbs the saved cores' parameters first, so a load that rebuilt the cores
without restoring their weights would fail the exact comparison.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import swapformer
from swapformer import checkpoint
from swapformer.checkpoint.hashing import file_sha256
from swapformer.errors import InputError, UnknownTargetError

VOCAB, D, HEADS = 100, 32, 4


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(D, 3 * D)
        self.proj = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (z.view(b, t, HEADS, D // HEADS).transpose(1, 2) for z in self.qkv(x).split(D, -1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, T, Dh]
        return self.proj(y.transpose(1, 2).reshape(b, t, D))


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = _Attention()
        self.mlp = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        return x + self.mlp(x)


class TinyLM(nn.Module):
    """A plain (non-HF) causal LM: embedding, ``layers`` blocks, head."""

    def __init__(self, layers: int = 2) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.blocks = nn.ModuleList(_Block() for _ in range(layers))
        self.head = nn.Linear(D, VOCAB)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.emb(idx)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def perturb_cores(model: nn.Module) -> int:
    """Add noise to every parameter of every replaced core; returns how many tensors changed."""
    changed = 0
    with torch.no_grad():
        for rep in model.swapformer_report.replaced:
            for p in model.get_submodule(rep.core_name).parameters():
                p.add_(0.1 * torch.randn_like(p))
                changed += 1
    return changed


HYBRID_SHORT = {name: {"local_window": 3, "sinks": 1} for name in ("fastweight", "elita", "cat")}


def trainable_target() -> str:
    """A registered target whose cores have new parameters (perturbing them must matter)."""
    for name in ("fastweight", "elita", "worker", "cat"):
        if name in swapformer.available_targets():
            return name
    pytest.skip("no target with trainable parameters is registered")


@pytest.fixture(scope="module")
def base() -> TinyLM:
    torch.manual_seed(0)
    return TinyLM().eval()


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def saved_sdpa(base: TinyLM, ids: torch.Tensor, tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    model = swapformer.rewrite(base, "sdpa", example_inputs=ids, kinds=("attention", "ffn"))
    assert perturb_cores(model) > 0  # the exact FFN cores hold (copied) weights
    path = checkpoint.save(model, tmp_path_factory.mktemp("sdpa"))
    return model, path


def test_plain_sdpa_round_trip_is_exact(saved_sdpa: tuple[nn.Module, Path], base: TinyLM, ids: torch.Tensor) -> None:
    model, path = saved_sdpa
    assert sorted(p.name for p in path.iterdir()) == ["cores.safetensors", "swapformer.json"]
    loaded = checkpoint.load(path, base)
    assert isinstance(loaded, torch.fx.GraphModule)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)
    assert [r.core_name for r in loaded.swapformer_report.replaced] == [
        r.core_name for r in model.swapformer_report.replaced]


def test_recipe_records_what_it_promises(saved_sdpa: tuple[nn.Module, Path], base: TinyLM) -> None:
    recipe = checkpoint.read_recipe(saved_sdpa[1])
    assert recipe["format"] == checkpoint.FORMAT and recipe["versions"]["swapformer"] == swapformer.__version__
    assert recipe["rewrite"]["target"] == {"target": "sdpa", "version": 1}
    assert recipe["rewrite"]["kinds"] == ["attention", "ffn"]
    assert recipe["rewrite"]["example_inputs"]["args"][0]["tensor"]["shape"] == [2, 16]
    assert {s["decision"] for s in recipe["sites"]} == {"replaced"}
    assert recipe["source"]["parameters"]["emb.weight"] == [[VOCAB, D], "float32"]
    assert len(recipe["recipe_hash"]) == 64
    # Only the cores' state is stored, never the base weights.
    from safetensors.torch import load_file

    keys = load_file(str(saved_sdpa[1] / checkpoint.CORES_FILE)).keys()
    assert keys and all(k.startswith("swapformer_cores.") for k in keys)


def test_trainable_target_round_trip_restores_weights(base: TinyLM, ids: torch.Tensor, tmp_path: Path) -> None:
    # a window short enough that the hybrid's far memory (and so every new parameter) is used
    model = swapformer.rewrite(base, trainable_target(), example_inputs=ids, verify=False,
                               **HYBRID_SHORT.get(trainable_target(), {}))
    with torch.no_grad():
        before = model(ids)
        assert perturb_cores(model) > 0
        after = model(ids)
    assert not torch.equal(before, after)  # so the exact match below is the saved weights
    checkpoint.save(model, tmp_path, base_model=base)
    loaded = checkpoint.load(tmp_path, base)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), after, rtol=0, atol=0)


def test_changed_base_weights_are_saved_with_base_model(saved_sdpa: tuple[nn.Module, Path], base: TinyLM,
                                                        ids: torch.Tensor, tmp_path: Path) -> None:
    model = saved_sdpa[0]
    with torch.no_grad():
        model.get_parameter("head.bias").add_(1.0)  # as LoRA merged by calibration would
    try:
        checkpoint.save(model, tmp_path, base_model=base)
        assert (tmp_path / checkpoint.HOST_FILE).is_file()
        loaded = checkpoint.load(tmp_path, base)
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)
    finally:
        with torch.no_grad():
            model.get_parameter("head.bias").sub_(1.0)


def test_load_refuses_another_architecture(saved_sdpa: tuple[nn.Module, Path]) -> None:
    with pytest.raises(checkpoint.RecipeMismatchError, match=r"not in the recipe: blocks\.2\."):
        checkpoint.load(saved_sdpa[1], TinyLM(layers=3).eval())


def test_load_refuses_different_site_decisions(saved_sdpa: tuple[nn.Module, Path], base: TinyLM,
                                               tmp_path: Path) -> None:
    recipe = checkpoint.read_recipe(saved_sdpa[1])
    recipe["sites"][0]["core_type"] = "SomethingElse"
    (tmp_path / checkpoint.RECIPE_FILE).write_text(json.dumps(recipe))
    (tmp_path / checkpoint.CORES_FILE).write_bytes((saved_sdpa[1] / checkpoint.CORES_FILE).read_bytes())
    with pytest.raises(checkpoint.RecipeMismatchError, match=r"site blocks\.0\.attn:0: core_type 'SomethingElse'"):
        checkpoint.load(tmp_path, base)


def test_load_warns_about_other_base_weights(saved_sdpa: tuple[nn.Module, Path]) -> None:
    torch.manual_seed(123)
    with pytest.warns(UserWarning, match="base weights differ"):
        checkpoint.load(saved_sdpa[1], TinyLM().eval())


def test_unknown_target_and_bad_directories(saved_sdpa: tuple[nn.Module, Path], base: TinyLM,
                                            tmp_path: Path) -> None:
    recipe = checkpoint.read_recipe(saved_sdpa[1])
    recipe["rewrite"]["target"] = {"target": "no-such-target", "version": 1}
    (tmp_path / checkpoint.RECIPE_FILE).write_text(json.dumps(recipe))
    with pytest.raises(UnknownTargetError, match="no-such-target"):
        checkpoint.load(tmp_path, base)
    with pytest.raises(InputError, match="no swapformer.json"):
        checkpoint.load(tmp_path / "missing", base)
    with pytest.raises(InputError, match="no swapformer_report"):
        checkpoint.save(base, tmp_path / "plain")


# Hugging Face


@pytest.fixture(scope="module")
def hf_base() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def hf_saved(hf_base: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    model = swapformer.rewrite(hf_base, "sdpa", kinds=("attention", "ffn"))
    assert perturb_cores(model) > 0
    path = tmp_path_factory.mktemp("hf")
    with pytest.raises(InputError, match="base_model"):
        checkpoint.save_pretrained(model, path)  # the FFN modules' base weights are gone from the model
    return model, checkpoint.save_pretrained(model, path, base_model=hf_base)


def test_hf_save_pretrained_round_trip(hf_saved: tuple[nn.Module, Path], hf_base: nn.Module,
                                       ids: torch.Tensor) -> None:
    model, path = hf_saved
    assert {"config.json", "model.safetensors", checkpoint.RECIPE_FILE, checkpoint.CORES_FILE} <= {p.name for p in path.iterdir()}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the base weights must be the recorded ones
        loaded = checkpoint.from_pretrained(path)
    assert type(loaded) is type(hf_base) and loaded.config._attn_implementation.startswith("swapformer_")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert hf_base.config._attn_implementation == "sdpa"  # the base model was not touched


def test_hf_load_refuses_another_config(hf_saved: tuple[nn.Module, Path], hf_base: nn.Module) -> None:
    transformers = pytest.importorskip("transformers")
    config = hf_base.config.to_dict() | {"rope_parameters": {"rope_theta": 500.0, "rope_type": "default"}}
    other = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()
    with pytest.raises(checkpoint.RecipeMismatchError, match="rope_parameters"):
        checkpoint.load(hf_saved[1], other)


# damaged or hostile checkpoints


def _copy_saved(src: Path, dst: Path) -> Path:
    for name in (checkpoint.RECIPE_FILE, checkpoint.CORES_FILE):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def test_flipped_bit_in_cores_is_refused(saved_sdpa: tuple[nn.Module, Path], base: TinyLM, tmp_path: Path) -> None:
    path = _copy_saved(saved_sdpa[1], tmp_path)
    data = bytearray((path / checkpoint.CORES_FILE).read_bytes())
    data[-1] ^= 0x01  # a tensor byte: safetensors alone would load it without complaint
    (path / checkpoint.CORES_FILE).write_bytes(bytes(data))
    with pytest.raises(checkpoint.RecipeMismatchError, match=r"cores\.safetensors does not match the sha256"):
        checkpoint.load(path, base)


def test_truncated_cores_with_matching_checksum_is_a_named_error(saved_sdpa: tuple[nn.Module, Path],
                                                                 base: TinyLM, tmp_path: Path) -> None:
    path = _copy_saved(saved_sdpa[1], tmp_path)
    cores = path / checkpoint.CORES_FILE
    cores.write_bytes(cores.read_bytes()[:100])
    recipe = checkpoint.read_recipe(path)
    recipe["files"]["cores_sha256"] = file_sha256(cores)  # as if saved truncated
    (path / checkpoint.RECIPE_FILE).write_text(json.dumps(recipe))
    with pytest.raises(InputError, match=r"cannot read .*cores\.safetensors as safetensors"):
        checkpoint.load(path, base)


def test_missing_cores_and_broken_recipe_are_named(saved_sdpa: tuple[nn.Module, Path], base: TinyLM,
                                                   tmp_path: Path) -> None:
    path = _copy_saved(saved_sdpa[1], tmp_path)
    (path / checkpoint.CORES_FILE).unlink()
    with pytest.raises(InputError, match=r"cannot read .*cores\.safetensors"):
        checkpoint.load(path, base)
    (path / checkpoint.RECIPE_FILE).write_text('{"format": "swapformer-recipe", "format_version": 1}')
    with pytest.raises(InputError, match=r"swapformer\.json is not a complete swapformer recipe.*files"):
        checkpoint.load(path, base)
    (path / checkpoint.RECIPE_FILE).write_bytes(b"\xff\xfe{")
    with pytest.raises(InputError, match=r"swapformer\.json"):
        checkpoint.load(path, base)


@pytest.mark.parametrize("name", ["../cores.safetensors", "/etc/passwd", "sub/cores.safetensors", "..", "",
                                  "a\\b"])
def test_recipe_file_names_must_stay_in_the_directory(saved_sdpa: tuple[nn.Module, Path], base: TinyLM,
                                                      tmp_path: Path, name: str) -> None:
    path = _copy_saved(saved_sdpa[1], tmp_path)
    recipe = checkpoint.read_recipe(path)
    recipe["files"]["cores"] = name
    (path / checkpoint.RECIPE_FILE).write_text(json.dumps(recipe))
    with pytest.raises(InputError, match="must be bare names"):
        checkpoint.load(path, base)


def test_host_file_is_checksummed(saved_sdpa: tuple[nn.Module, Path], base: TinyLM, tmp_path: Path) -> None:
    model = saved_sdpa[0]
    with torch.no_grad():
        model.get_parameter("head.bias").add_(1.0)
    try:
        checkpoint.save(model, tmp_path, base_model=base)
    finally:
        with torch.no_grad():
            model.get_parameter("head.bias").sub_(1.0)
    assert checkpoint.read_recipe(tmp_path)["files"]["host_sha256"]
    data = bytearray((tmp_path / checkpoint.HOST_FILE).read_bytes())
    data[-1] ^= 0x01
    (tmp_path / checkpoint.HOST_FILE).write_bytes(bytes(data))
    with pytest.raises(checkpoint.RecipeMismatchError, match=r"host\.safetensors does not match"):
        checkpoint.load(tmp_path, base)
