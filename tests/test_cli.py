"""The ``swapformer`` command line, run in-process through ``main([...])`` and once as a subprocess.

Models: :func:`tiny_lm`, a ``FILE.py:factory`` model defined here, and a tiny Llama with a
character-level tokenizer saved to a temporary Hugging Face directory.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from swapformer.cli import main, parse_option
from swapformer.cli import zoo as zoo_command

D, HEADS, VOCAB = 32, 4, 100
TEXT = "\n".join(f"Line {i}: the quick brown fox jumps over the lazy dog, and so on." for i in range(80))


class _TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.qkv = nn.Linear(D, 3 * D)
        self.proj = nn.Linear(D, D)
        self.head = nn.Linear(D, VOCAB)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.emb(idx)
        b, t, _ = x.shape
        q, k, v = (z.view(b, t, HEADS, D // HEADS).transpose(1, 2) for z in self.qkv(x).split(D, -1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, T, Dh]
        return self.head(x + self.proj(y.transpose(1, 2).reshape(b, t, D)))


def tiny_lm() -> tuple[nn.Module, torch.Tensor]:
    """The ``FILE.py:factory`` model of these tests: a model and its example inputs."""
    torch.manual_seed(0)
    return _TinyLM().eval(), torch.randint(0, VOCAB, (2, 16))


FACTORY = f"{Path(__file__).resolve()}:tiny_lm"


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main([*args, "--no-progress"] if args and args[0] not in ("zoo",) else args)
    out, err = capsys.readouterr()
    return code, out, err


def _char_tokenizer() -> object:
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {"<unk>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = _char_tokenizer()
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=128)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text(TEXT)
    return path


def test_help_via_subprocess() -> None:
    proc = subprocess.run([sys.executable, "-m", "swapformer.cli", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for word in ("explain", "convert", "bench", "targets", "zoo", "examples:"):
        assert word in proc.stdout


def test_command_help_has_examples(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["convert", "--help"], capsys)
    assert code == 0 and "examples:" in out and "--calibrate-tokens" in out


def test_targets_lists_options(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["targets"], capsys)
    assert code == 0
    assert "sdpa  [attention, ffn, exact]" in out and "(no options)" in out
    if "fastweight" in out:
        assert "local_window=64" in out and "sinks=4" in out


def test_bad_model_path_fails_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["explain", str(tmp_path / "nope")], capsys)
    assert code == 1 and out == ""
    assert err.startswith("swapformer: error: MODEL ") and "does not exist" in err
    assert len(err.strip().splitlines()) == 1


def test_unknown_target_fails_before_loading(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["convert", str(tmp_path / "not-loaded"), "--target", "nope", "--out", str(tmp_path)], capsys)
    assert code == 1 and err.startswith("swapformer: error: unknown target 'nope'")
    code, _, err = run(["explain", FACTORY, "-o", "nosuch=1"], capsys)
    assert code == 1 and "has no option(s) ['nosuch']" in err


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["convert"], capsys)
    assert code == 2 and "swapformer convert: error:" in err
    code, _, err = run(["explain", FACTORY, "--kinds", "attention,mlp"], capsys)
    assert code == 2 and "kinds must be" in err


def test_parse_option_values() -> None:
    assert parse_option("window=64") == ("window", 64)
    assert parse_option("normalize=true") == ("normalize", True)
    assert parse_option("feature_map=elu1") == ("feature_map", "elu1")
    assert parse_option("eps=1e-5") == ("eps", 1e-5)


def test_zoo_is_dispatched(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    seen: list[list[str]] = []
    monkeypatch.setattr(zoo_command, "zoo_main", lambda argv: seen.append(argv) or 3)
    code, _, _ = run(["zoo", "--models", "llama", "-v"], capsys)
    assert code == 3 and seen == [["--models", "llama", "-v"]]


def test_explain_factory_model(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["explain", FACTORY, "--target", "sdpa"], capsys)
    assert code == 0, err
    assert "would replace by SdpaAttention" in out and "1 replaced, 0 skipped" in out


def test_convert_and_bench_factory_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "converted"
    code, out, err = run(["convert", FACTORY, "--target", "sdpa", "--out", str(out_dir)], capsys)
    assert code == 0, err
    assert "saved to" in out and (out_dir / "swapformer.json").is_file()
    assert json.loads((out_dir / "swapformer.json").read_text())["metadata"]["model_spec"] == FACTORY
    report = tmp_path / "bench.json"
    code, out, err = run(["bench", str(out_dir), "--repeats", "1", "--json", str(report)], capsys)
    assert code == 0, err
    assert "prefill tokens/s (32 tokens)" in out and "n/a: no KV-cache" in out
    rows = json.loads(report.read_text())
    assert rows[0]["ratio"] > 0 and rows[-1]["note"] == "n/a: MODEL has no tokenizer"


@pytest.mark.filterwarnings("error:.*base weights differ")
def test_hf_convert_calibrate_and_bench(hf_dir: Path, corpus: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("peft")  # --calibrate-tokens with --full merges LoRA adapters
    out_dir = tmp_path / "fw"
    code, out, err = run(["convert", str(hf_dir), "-t", "fastweight", "--out", str(out_dir), "--full",
                          "--calibrate-tokens", "128", "--seq-len", "32", "--batch-size", "2",
                          "--corpus", str(corpus)], capsys)
    assert code == 0, err
    assert {"config.json", "model.safetensors", "cores.safetensors", "tokenizer.json"} <= {
        p.name for p in out_dir.iterdir()}
    recipe = json.loads((out_dir / "swapformer.json").read_text())
    assert recipe["metadata"]["calibration"]["tokens"] > 0
    assert recipe["files"]["host"] == "host.safetensors"  # LoRA merged into the base projections
    code, out, err = run(["bench", str(out_dir), "--seq-len", "32", "--repeats", "1", "--decode-tokens", "2",
                          "--corpus", str(corpus), "--ppl-batches", "2"], capsys)
    assert code == 0, err
    assert "decode ms/token (2 tokens)" in out and "perplexity (text.txt" in out


def test_bench_encoder_decoder_prefills_and_decodes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    transformers = pytest.importorskip("transformers")
    base = tmp_path / "tiny-t5"
    config = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                   num_decoder_layers=1, num_heads=4, decoder_start_token_id=0)
    torch.manual_seed(0)
    transformers.T5ForConditionalGeneration(config).save_pretrained(base)
    out_dir = tmp_path / "t5-window"
    code, _, err = run(["convert", str(base), "-t", "window", "--option", "window=8", "--out", str(out_dir)],
                       capsys)
    assert code == 0, err
    code, out, err = run(["bench", str(out_dir), "--seq-len", "16", "--repeats", "1", "--decode-tokens", "2",
                          "--ppl-batches", "0"], capsys)
    assert code == 0, err
    assert "prefill tokens/s" in out and "decode ms/token (2 tokens)" in out
