"""Building a zoo model: Hugging Face configs (random init), timm models, and every ``MODEL`` spec."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from swapformer.loading.models import load_model
from swapformer.loading.offline import load_minilm
from swapformer.rewriter.api import default_example_inputs
from swapformer.rewriter.hf import is_hf_model
from swapformer.zoo.spec import TIMM_ENV_HINT, ZooEntry, import_timm


@dataclass
class Built:
    """A zoo model ready to rewrite."""

    model: Any
    inputs: Any  # example inputs; None for Hugging Face models (swapformer builds them)
    tokenizer: Any
    info: dict[str, Any]  # architecture, model_type, how it was built
    check_inputs: Any = None  # the inputs the invariant checks and timings use


def build_model(entry: ZooEntry) -> Built:
    """Build the model of a zoo entry (random init for ``hf_config`` and ``timm:`` entries)."""
    torch.manual_seed(0)
    if entry.hf_config is not None:
        built = _build_hf_config(entry)
    elif entry.model.startswith("timm:"):
        built = _build_timm(entry)
    elif entry.model == "minilm":
        model, tokenizer = load_minilm()
        built = Built(model, None, tokenizer, {"kind": "minilm"})
    else:
        loaded = load_model(entry.model)
        built = Built(loaded.model, loaded.example_inputs, loaded.tokenizer, {"kind": loaded.kind})
    model = built.model.eval()
    built.info["architecture"] = type(model).__name__
    built.info["model_type"] = getattr(getattr(model, "config", None), "model_type", None)
    if built.inputs is None and is_hf_model(model):
        built.check_inputs = default_example_inputs(model)
    else:
        built.check_inputs = built.inputs
    return built


def _build_hf_config(entry: ZooEntry) -> Built:
    import transformers  # optional (the hf extra): only hf_config entries need it

    config = transformers.AutoConfig.for_model(**entry.hf_config)
    impl = entry.settings.get("attn_implementation", "sdpa")
    names = [entry.settings["model_class"]] if "model_class" in entry.settings else \
        ["AutoModelForCausalLM", "AutoModelForSeq2SeqLM", "AutoModel"]
    for name in names:
        cls = getattr(transformers, name)
        try:
            model = (cls.from_config(config, attn_implementation=impl) if name.startswith("Auto")
                     else cls._from_config(config, attn_implementation=impl))
            break
        except ValueError:  # this auto class has no mapping for the model type: try the next
            if name == names[-1]:
                raise
    return Built(model, None, None, {"kind": "hf_config", "class": name})


def _build_timm(entry: ZooEntry) -> Built:
    timm = import_timm()
    if timm is None:
        raise RuntimeError(TIMM_ENV_HINT)
    name, size = entry.model.split(":", 1)[1], int(entry.settings.get("img_size", 64))
    model, size = create_timm_model(timm, name, size)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    return Built(model, (x,), None, {"kind": "timm", "img_size": size})


def create_timm_model(timm: Any, name: str, img_size: int) -> tuple[Any, int]:
    """A random-init timm model at ``img_size`` when it takes one and runs at it, else at its
    default size."""
    kwargs = {"pretrained": False, "num_classes": 10}
    try:
        model = timm.create_model(name, img_size=img_size, **kwargs).eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, img_size, img_size))
        return model, img_size
    except Exception:  # noqa: BLE001 - not every timm model takes img_size (TypeError, asserts, ...)
        model = timm.create_model(name, **kwargs).eval()
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
    return model, int(size)


def has_logits(model: Any) -> bool:
    """Whether ``model`` has a language-model head (``get_output_embeddings``)."""
    get = getattr(model, "get_output_embeddings", None)
    return callable(get) and get() is not None


def rewrite_is_exact(student: Any) -> bool:
    """Whether every replaced site of ``student`` got an exact target (a plan mixes targets)."""
    from swapformer.targets.base import resolve_target

    return all((r.config or resolve_target(r.target)).exact for r in student.swapformer_report.replaced)


def plan_data(built: Built, settings: dict[str, Any]) -> torch.Tensor:
    """``[plan_batches, plan_seq_len]`` input ids a planner (``target = "auto"``) measures on: the
    entry's corpus when the model has a tokenizer, else random ids below the config's vocabulary.

    Raises:
        ValueError: the model has neither a tokenizer nor a ``config.vocab_size``.
    """
    from swapformer.loading.data import pack
    from swapformer.loading.offline import corpus_tokens

    rows, length = int(settings.get("plan_batches", 2)), int(settings.get("plan_seq_len", 256))
    if built.tokenizer is not None:
        docs = corpus_tokens(settings.get("corpus", "shakespeare"), built.tokenizer)
        return pack(docs, length, sep_token=built.tokenizer.eos_token_id)[:rows]
    vocab = getattr(getattr(built.model, "config", None), "vocab_size", None)
    if not vocab:
        raise ValueError("target 'auto' needs token ids to plan on: the model has no tokenizer and no "
                         "config.vocab_size")
    return torch.randint(0, int(vocab), (rows, length), generator=torch.Generator().manual_seed(0))
