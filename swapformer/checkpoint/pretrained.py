"""Hugging Face directories: the base model next to the recipe (:func:`save_pretrained`,
:func:`from_pretrained`)."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from swapformer.checkpoint.load import load
from swapformer.checkpoint.recipe import excluded_prefixes, read_recipe, recipe_dir, site_decisions
from swapformer.checkpoint.save import report_of, save
from swapformer.errors import InputError
from swapformer.rewriter.hf import is_hf_model


def save_pretrained(model: nn.Module, directory: str | Path, *, base_model: nn.Module | None = None,
                    tokenizer: Any = None, metadata: Mapping[str, Any] | None = None,
                    **hf_kwargs: Any) -> Path:
    """Write a rewritten Hugging Face model as a loadable HF directory plus its recipe and cores.

    ``directory`` gets the base model in HF form (``config.json``, ``model.safetensors``: the base
    weights as they are in ``model``, calibrated changes included) and :func:`save`'s files, so
    ``from_pretrained(directory)`` rebuilds the converted model with nothing else, and
    ``AutoModel*.from_pretrained(directory)`` alone gives the base model.

    Args:
        model: the rewritten HF model.
        directory: where to write (created).
        base_model: the model ``model`` was rewritten from; required when the rewrite replaced
            whole modules (FFN sites), whose base weights ``model`` no longer holds. With it, base
            weights that changed (calibration) also go to ``host.safetensors``, so the recipe
            loads onto the original model as well as onto the one in ``directory``.
        tokenizer: saved beside the model when given.
        metadata: as in :func:`save`.
        hf_kwargs: passed to ``model.save_pretrained`` (``max_shard_size``, ...).

    Returns:
        The directory written.

    Raises:
        InputError: not a Hugging Face model, or ``base_model`` missing where needed.
    """
    if not is_hf_model(model):
        raise InputError("save_pretrained needs a Hugging Face model; use swapformer.save for others")
    sites = site_decisions(report_of(model))
    skip = excluded_prefixes(sites)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(skip)}
    replaced_modules = [s["module"] for s in sites if s["decision"] == "replaced" and s["how"] == "module"
                        and s["kind"] == "ffn"]
    if replaced_modules:
        if base_model is None:
            raise InputError(f"the rewrite replaced whole modules ({', '.join(replaced_modules[:3])}); "
                             "pass base_model=... so their base weights can be saved")
        prefixes = tuple(m + "." for m in replaced_modules)
        state.update({k: v for k, v in base_model.state_dict().items() if k.startswith(prefixes)})
    out = Path(directory)
    model.save_pretrained(out, state_dict=state, **hf_kwargs)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    meta = {**dict(metadata or {}), "hf_weights": True}
    return save(model, out, base_model=base_model, metadata=meta)


def from_pretrained(directory: str | Path, model_class: Any = None, **hf_kwargs: Any) -> nn.Module:
    """Load a directory written by :func:`save_pretrained`: the base with transformers, then the recipe.

    Args:
        directory: the directory.
        model_class: a transformers class or auto class (``AutoModelForCausalLM``); default: the
            class recorded in the recipe (only classes that ``transformers`` exports are imported).
        hf_kwargs: passed to ``model_class.from_pretrained``.

    Returns:
        The converted model, as :func:`load` returns it.

    Raises:
        InputError: no recipe or no HF weights in ``directory``, or an unusable recorded class.
        RecipeMismatchError: see :func:`load`.
    """
    recipe = read_recipe(directory)
    directory = recipe_dir(directory)
    if not (directory / "config.json").is_file():
        raise InputError(f"{directory} holds a recipe but no Hugging Face model (config.json); "
                         "use swapformer.load(directory, base_model=...)")
    cls = model_class or _recorded_hf_class(recipe)
    hf_kwargs.setdefault("local_files_only", True)
    base = cls.from_pretrained(directory, **hf_kwargs).eval()
    return load(directory, base)


def _recorded_hf_class(recipe: Mapping[str, Any]) -> Any:
    path = recipe["source"].get("class") or ""
    module, _, name = path.rpartition(".")
    if not module.startswith("transformers."):
        raise InputError(f"the recipe's model class {path!r} is not a transformers class; pass model_class=")
    import transformers

    cls = getattr(transformers, name, None) or getattr(importlib.import_module(module), name, None)
    if cls is None or not issubclass(cls, transformers.PreTrainedModel):
        raise InputError(f"transformers has no model class {name!r}; pass model_class=")
    return cls
