"""Save a rewritten model as a recipe plus its cores' weights, and rebuild it by replaying the recipe.

A converted model is stored the PEFT way, as what is new relative to its base model:

* ``swapformer.json``: the recipe: the base model's identity (class, Hugging Face ``model_type``
  and ``_name_or_path``, a hash of its config, the names and shapes of its parameters and a hash of
  them, a digest of each parameter's values), the target config (``config.to_dict()``, rebuilt only
  through the target registry), the site kinds, the example inputs' shapes and dtypes, every site's
  decision (replaced: ``core_name``/``core_type``; skipped: the reason), versions, and a hash of all
  that;
* ``cores.safetensors``: the state of every replacement core, keyed by its name in the model;
* ``host.safetensors`` (only when :func:`save` got ``base_model`` and some base weight changed,
  e.g. LoRA merged by calibration): those changed base weights.

:func:`load` replays :func:`swapformer.rewrite` on the base model the caller passes (a rewritten
``GraphModule`` does not pickle reliably, and base weights need not be copied), checks that the
replay made the same decision at every site, and loads the saved weights. A base model that does
not fit the recipe is refused with :class:`RecipeMismatchError`, which names what differs.

For Hugging Face models :func:`save_pretrained` additionally writes the base model in the same
directory (``config.json`` + ``model.safetensors``), so :func:`from_pretrained` needs nothing else.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import logging
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from swapformer.errors import InputError, SwapformerError
from swapformer.rewriter.report import RewriteReport
from swapformer.targets.base import TargetConfig, resolve_target

log = logging.getLogger(__name__)

FORMAT = "swapformer-recipe"
FORMAT_VERSION = 1
RECIPE_FILE = "swapformer.json"
CORES_FILE = "cores.safetensors"
HOST_FILE = "host.safetensors"
# top-level recipe entries load() reads, and their JSON types
_RECIPE_KEYS: dict[str, type] = {"source": dict, "rewrite": dict, "sites": list, "files": dict}
FILTER_SKIP = "excluded by filter_fn"
# HF config entries that say how a model was loaded or run, not what it computes.
_VOLATILE_CONFIG_KEYS = {
    "architectures", "dtype", "torch_dtype", "transformers_version", "use_cache", "return_dict",
    "output_attentions", "output_hidden_states", "quantization_config", "attn_implementation",
}


class RecipeMismatchError(SwapformerError, ValueError):
    """A saved recipe does not fit the base model it is loaded onto; the message names what differs."""


# saving


def save(model: nn.Module, path: str | Path, *, base_model: nn.Module | None = None,
         example_inputs: Any = None, target: str | TargetConfig | None = None,
         kinds: tuple[str, ...] | None = None, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``model`` (returned by :func:`swapformer.rewrite`) as a recipe plus its cores' weights.

    Args:
        model: the rewritten model (it carries ``swapformer_report``), calibrated or not.
        path: directory to write ``swapformer.json`` and ``cores.safetensors`` into (created).
        base_model: the model ``model`` was rewritten from. Optional; when given, base weights that
            changed since (e.g. LoRA merged by calibration) are saved too, in ``host.safetensors``.
        example_inputs: the inputs ``model`` was captured with. Needed only for plain models
            captured by ``torch.fx`` (exported graphs record their input shapes, and Hugging Face
            models are rewritten with default inputs).
        target: the target config (or name) used; default: the config the cores carry.
        kinds: the site kinds the rewrite looked for; default: the kinds of the detected sites.
        metadata: extra JSON-serialisable facts to store under ``"metadata"``.

    Returns:
        The directory written.

    Raises:
        InputError: ``model`` has no rewrite report or its report is a dry run, the input shapes
            are unknown, or ``metadata`` is not JSON-serialisable.
    """
    report = _report_of(model)
    config = _target_config(model, report, target)
    extra = _checked_metadata(metadata)
    sites = site_decisions(report)
    skip = excluded_prefixes(sites)
    recipe = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "versions": _versions(),
        "source": source_identity(model, skip, base_model),
        "rewrite": {
            "target": _jsonable(config.to_dict()),
            "kinds": list(kinds) if kinds else _site_kinds(report),
            "hf": _is_hf(model),
            "capture": report.capture,
            "example_inputs": _input_spec_for(model, example_inputs),
        },
        "sites": sites,
    }
    recipe["recipe_hash"] = _recipe_hash(recipe)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    recipe["files"] = _write_weights(model, out, sites, skip, base_model)
    recipe["metadata"] = extra
    (out / RECIPE_FILE).write_text(json.dumps(recipe, indent=1) + "\n")
    log.info("saved %d replaced sites of %s to %s", len(report.replaced), config.name, out)
    return out


def _report_of(model: nn.Module) -> RewriteReport:
    report = getattr(model, "swapformer_report", None)
    if not isinstance(report, RewriteReport):
        raise InputError("the model has no swapformer_report: save the model swapformer.rewrite returned")
    if report.dry_run:
        raise InputError("the model's report is a dry run (from explain): nothing was replaced")
    return report


def _target_config(model: nn.Module, report: RewriteReport,
                   target: str | TargetConfig | None) -> TargetConfig:
    """The config the rewrite used: given, else the one the cores carry, else the defaults."""
    if target is not None:
        config = resolve_target(target)
    else:
        carried = [getattr(model.get_submodule(r.core_name), "config", None) for r in report.replaced]
        configs = [c for c in carried if isinstance(c, TargetConfig)]
        config = configs[0] if configs else resolve_target(report.target)
    if config.name != report.target:
        raise InputError(f"target {config.name!r} is not the target {report.target!r} the model was rewritten to")
    return config


def site_decisions(report: RewriteReport) -> list[dict[str, Any]]:
    """One JSON record per detected site, in report order: replaced (with ``core_name``,
    ``core_type`` and ``how``) or skipped (with ``reason``)."""
    replaced = {r.site.name: r for r in report.replaced}
    skipped = {s.site.name: s for s in report.skipped}
    records = []
    for site in report.sites:
        record: dict[str, Any] = {"name": site.name, "kind": site.kind, "module": site.module}
        if site.name in replaced:
            r = replaced[site.name]
            record.update(decision="replaced", core_name=r.core_name, core_type=r.core_type, how=r.how)
        elif site.name in skipped:
            record.update(decision="skipped", reason=skipped[site.name].reason)
        else:
            record.update(decision="none")
        record["detected"] = _jsonable(dataclasses.asdict(site))
        records.append(record)
    return records


def excluded_prefixes(sites: list[dict[str, Any]]) -> tuple[str, ...]:
    """Name prefixes that are not base weights: cores, and modules replaced as a whole (HF FFNs)."""
    prefixes = []
    for s in sites:
        if s["decision"] != "replaced":
            continue
        prefixes.append(s["core_name"] + ".")
        if s["how"] == "module" and s["kind"] == "ffn" and s["module"]:
            prefixes.append(s["module"] + ".")
    return tuple(prefixes)


def _site_kinds(report: RewriteReport) -> list[str]:
    kinds = {s.kind for s in report.sites}
    return [k for k in ("attention", "ffn") if k in kinds] or ["attention"]


def _is_hf(model: nn.Module) -> bool:
    from swapformer.rewriter.hf import is_hf_model

    return is_hf_model(model)


def _versions() -> dict[str, str | None]:
    import swapformer

    try:
        import transformers

        hf_version: str | None = transformers.__version__
    except ImportError:
        hf_version = None
    return {"swapformer": swapformer.__version__, "torch": torch.__version__, "transformers": hf_version}


def _checked_metadata(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    data = dict(metadata or {})
    try:
        json.dumps(data)
    except TypeError as e:
        raise InputError(f"metadata must be JSON-serialisable: {e}") from e
    return data


# identity of the base model


def source_identity(model: nn.Module, skip: tuple[str, ...], base_model: nn.Module | None = None) -> dict[str, Any]:
    """Class, HF identity, parameter names/shapes/dtypes (+ hash) and value digests of the base
    weights inside ``model`` (names under ``skip`` are not base weights)."""
    params = base_parameters(model, skip)
    cls = type(base_model if base_model is not None else model)
    graph = isinstance(model, torch.fx.GraphModule) and base_model is None
    return {
        "class": None if graph else f"{cls.__module__}.{cls.__qualname__}",
        "hf": hf_identity(model),
        "architecture_hash": architecture_hash(params),
        "parameters": {n: [list(p.shape), _dtype_name(p.dtype)] for n, p in params.items()},
        "weights": {n: tensor_digest(p) for n, p in params.items()},
    }


def base_parameters(model: nn.Module, skip: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """``model``'s parameters (tied ones once) whose names do not start with a ``skip`` prefix."""
    return {n: p for n, p in model.named_parameters() if not n.startswith(skip)}


def architecture_hash(params: Mapping[str, torch.Tensor]) -> str:
    """sha256 of the sorted parameter names and shapes (dtypes excluded: a cast is not a new model)."""
    text = json.dumps(sorted((n, list(p.shape)) for n, p in params.items()))
    return hashlib.sha256(text.encode()).hexdigest()


def tensor_digest(t: torch.Tensor) -> str:
    """A 16-hex-digit blake2b digest of a tensor's dtype, shape and bytes."""
    data = t.detach().to("cpu").contiguous().reshape(-1)
    h = hashlib.blake2b(f"{data.dtype}{tuple(t.shape)}".encode(), digest_size=8)
    h.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return h.hexdigest()


def hf_identity(model: nn.Module) -> dict[str, Any] | None:
    """``model_type``, ``_name_or_path`` and a hash of the config of a Hugging Face model."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return None
    stable = stable_config(config.to_dict())
    return {
        "model_type": getattr(config, "model_type", None),
        "name_or_path": getattr(config, "_name_or_path", None),
        "config_hash": hashlib.sha256(json.dumps(stable, sort_keys=True).encode()).hexdigest(),
        "config": stable,
    }


def stable_config(data: Any) -> Any:
    """A config dict without the entries that say how the model was loaded or run (recursive)."""
    if isinstance(data, Mapping):
        return {str(k): stable_config(v) for k, v in data.items()
                if not str(k).startswith("_") and k not in _VOLATILE_CONFIG_KEYS}
    return _jsonable(data)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.dtype):
        return _dtype_name(value)
    return repr(value)


def _recipe_hash(recipe: Mapping[str, Any]) -> str:
    keys = ("format_version", "rewrite", "sites")
    payload = {k: recipe[k] for k in keys}
    source = recipe["source"]
    payload["source"] = {"architecture_hash": source["architecture_hash"],
                         "config_hash": (source["hf"] or {}).get("config_hash")}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


# example inputs


def describe_inputs(example_inputs: Any) -> dict[str, Any]:
    """Shapes, dtypes and value ranges of example inputs, enough to rebuild equivalent ones.

    Raises:
        InputError: an input is neither a tensor nor a JSON scalar.
    """
    from swapformer.rewriter.capture import normalize_inputs

    args, kwargs = normalize_inputs(example_inputs)
    return {"args": [_describe(v) for v in args], "kwargs": {k: _describe(v) for k, v in kwargs.items()}}


def _describe(value: Any) -> dict[str, Any]:
    if isinstance(value, torch.Tensor):
        entry: dict[str, Any] = {"shape": list(value.shape), "dtype": _dtype_name(value.dtype)}
        if value.numel() and value.dtype != torch.bool and not value.is_floating_point():
            entry.update(low=int(value.min()), high=int(value.max()) + 1)
        if value.numel() and bool((value == value.reshape(-1)[0]).all()):
            entry["fill"] = value.reshape(-1)[0].item()
        return {"tensor": entry}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    raise InputError(f"cannot record an example input of type {type(value).__name__}; "
                     "use tensors and scalars, or pass example_inputs to load()")


def _input_spec_for(model: nn.Module, example_inputs: Any) -> dict[str, Any] | None:
    if example_inputs is not None:
        return describe_inputs(example_inputs)
    if _is_hf(model):
        return None  # rewrite builds its default inputs from the config, on load too
    return _graph_input_spec(model)


def _graph_input_spec(model: nn.Module) -> dict[str, Any]:
    """The input spec of an exported graph: placeholder shapes (their example hints) and dtypes."""
    in_spec = getattr(model, "_in_spec", None)
    holders = [n for n in model.graph.nodes if n.op == "placeholder"] if isinstance(model, torch.fx.GraphModule) else []
    vals = [n.meta.get("val") for n in holders]
    if in_spec is None or not holders or any(v is None for v in vals):
        raise InputError("cannot tell which inputs this model was captured with: "
                         "pass example_inputs=... to save()")
    leaves = [_describe_placeholder(v) for v in vals]
    args, kwargs = pytree.tree_unflatten(leaves, in_spec)
    return {"args": list(args), "kwargs": dict(kwargs)}


def _describe_placeholder(val: Any) -> dict[str, Any]:
    if not isinstance(val, torch.Tensor):
        return _describe(val)
    shape = [int(s.node.hint) if isinstance(s, torch.SymInt) else int(s) for s in val.shape]
    entry: dict[str, Any] = {"shape": shape, "dtype": _dtype_name(val.dtype)}
    if val.dtype != torch.bool and not val.dtype.is_floating_point:
        entry.update(low=0, high=2)  # values are not recorded in a graph; 0/1 index anything
    return {"tensor": entry}


def build_inputs(spec: Mapping[str, Any] | None, base_model: nn.Module | None = None) -> Any:
    """Example inputs from a spec written by :func:`describe_inputs` (``None`` stays ``None``).

    Integer tensors get random values in their recorded range, capped below the base model's
    ``config.vocab_size`` when it has one; floats are standard normal; constant tensors (an
    all-ones attention mask) are rebuilt constant. The generator is seeded: the result is fixed.
    """
    if spec is None:
        return None
    gen = torch.Generator().manual_seed(0)
    vocab = getattr(getattr(base_model, "config", None), "vocab_size", None)
    args = tuple(_build(e, gen, vocab) for e in spec.get("args", []))
    kwargs = {k: _build(e, gen, vocab) for k, e in spec.get("kwargs", {}).items()}
    return (args, kwargs)


def _build(entry: Mapping[str, Any], gen: torch.Generator, vocab: int | None) -> Any:
    if "value" in entry:
        return entry["value"]
    t = entry["tensor"]
    shape, dtype = tuple(t["shape"]), getattr(torch, t["dtype"])
    if "fill" in t:
        return torch.full(shape, t["fill"], dtype=dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    if dtype.is_floating_point or dtype.is_complex:
        return torch.randn(shape, generator=gen).to(dtype)
    high = min(t.get("high", 2), vocab) if vocab else t.get("high", 2)
    low = min(t.get("low", 0), high - 1)
    return torch.randint(low, high, shape, generator=gen, dtype=dtype)


# weights


def core_state(model: nn.Module, sites: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Every replaced core's state, keyed ``<core_name>.<key>``, as standalone CPU tensors."""
    state = {}
    for s in sites:
        if s["decision"] == "replaced":
            core = model.get_submodule(s["core_name"])
            for key, value in core.state_dict().items():
                state[f"{s['core_name']}.{key}"] = value.detach().to("cpu").clone().contiguous()
    return state


def changed_base_state(model: nn.Module, base_model: nn.Module, skip: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Base weights of ``model`` whose values differ from ``base_model``'s (same name and shape)."""
    base = base_model.state_dict()
    changed = {}
    for name, value in model.state_dict().items():
        ref = base.get(name)
        if name.startswith(skip) or ref is None or ref.shape != value.shape:
            continue
        if not torch.equal(value.detach().to("cpu"), ref.detach().to("cpu").to(value.dtype)):
            changed[name] = value.detach().to("cpu").clone().contiguous()
    return changed


def _write_weights(model: nn.Module, out: Path, sites: list[dict[str, Any]], skip: tuple[str, ...],
                   base_model: nn.Module | None) -> dict[str, Any]:
    from safetensors.torch import save_file

    files: dict[str, Any] = {"cores": CORES_FILE, "host": None}
    save_file(core_state(model, sites), str(out / CORES_FILE), metadata={"format": "pt"})
    files["cores_sha256"] = _file_sha256(out / CORES_FILE)
    changed = changed_base_state(model, base_model, skip) if base_model is not None else {}
    if changed:
        save_file(changed, str(out / HOST_FILE), metadata={"format": "pt"})
        files["host"] = HOST_FILE
        files["host_sha256"] = _file_sha256(out / HOST_FILE)
        log.info("saved %d changed base tensors to %s", len(changed), HOST_FILE)
    elif (out / HOST_FILE).exists():
        (out / HOST_FILE).unlink()
    return files


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError as e:
        raise InputError(f"cannot read {path}: {e}") from e
    return h.hexdigest()


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file.

    Raises:
        InputError: the file is missing, unreadable or not a valid safetensors file (named).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise InputError(f"cannot read {path} as safetensors: {e}") from e


# loading


def recipe_dir(path: str | Path) -> Path:
    """The directory of a recipe: ``path`` itself, or its parent when ``path`` is the JSON file."""
    p = Path(path)
    return p.parent if p.is_file() and p.name == RECIPE_FILE else p


def read_recipe(path: str | Path) -> dict[str, Any]:
    """The recipe in ``path/swapformer.json`` (``path`` may also name the JSON file itself).

    Raises:
        InputError: no recipe there, not a swapformer recipe, or a newer format than this version reads.
    """
    file = recipe_dir(path) / RECIPE_FILE
    if not file.is_file():
        raise InputError(f"no {RECIPE_FILE} in {file.parent}: not a directory written by swapformer.save")
    try:
        recipe = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read {file}: {e}") from e
    except json.JSONDecodeError as e:
        raise InputError(f"{file} is not valid JSON: {e}") from e
    if not isinstance(recipe, dict) or recipe.get("format") != FORMAT:
        raise InputError(f"{file} is not a swapformer recipe")
    if recipe.get("format_version", 0) > FORMAT_VERSION:
        raise InputError(f"{file} has format version {recipe['format_version']}; this swapformer "
                         f"reads up to {FORMAT_VERSION}: upgrade swapformer")
    missing = [k for k in _RECIPE_KEYS if not isinstance(recipe.get(k), _RECIPE_KEYS[k])]
    if missing:
        raise InputError(f"{file} is not a complete swapformer recipe: missing or malformed {missing}")
    return recipe


def recipe_file(directory: Path, recipe: Mapping[str, Any], key: str) -> Path | None:
    """The path of the file the recipe names under ``files[key]`` (``None`` when it names none).

    The recipe is data read from disk: a name that is absolute, holds a path separator or is
    ``.``/``..`` could reach outside ``directory``, so only bare file names are accepted.

    Raises:
        InputError: the name is not a bare file name.
    """
    name = recipe["files"].get(key)
    if name is None and key != "cores":
        return None
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
            or Path(name).name != name or Path(name).is_absolute()):
        raise InputError(f"{directory / RECIPE_FILE} names {name!r} as its {key} file; recipe file "
                         f"names must be bare names of files inside {directory}")
    return directory / name


def check_files(directory: Path, recipe: Mapping[str, Any]) -> None:
    """Refuse weight files whose sha256 differs from the one :func:`save` recorded.

    Raises:
        InputError: a file name is not a bare name, or a file is missing or unreadable.
        RecipeMismatchError: a file changed after saving (corruption, an edit, another save).
    """
    for key in ("cores", "host"):
        path = recipe_file(directory, recipe, key)
        if path is None:
            continue
        recorded = recipe["files"].get(f"{key}_sha256")
        if recorded is None:
            if key == "cores":
                raise RecipeMismatchError(f"{directory / RECIPE_FILE} records no checksum of {path.name}")
            # recipes written before host checksums existed: say so rather than pass silently
            log.warning("%s has no recorded checksum; it is loaded unchecked", path)
            continue
        actual = _file_sha256(path)
        if actual != recorded:
            raise RecipeMismatchError(f"{path} does not match the sha256 recorded in {RECIPE_FILE} "
                                      f"({recorded[:12]}... recorded, {actual[:12]}... now): the file "
                                      "was corrupted or replaced after saving")


def target_config(recipe: Mapping[str, Any]) -> TargetConfig:
    """The recipe's target config, rebuilt through the target registry (the only classes allowed).

    Raises:
        UnknownTargetError: the target is not registered here. ConfigError: its options are invalid.
    """
    options = dict(recipe["rewrite"]["target"])
    name = options.pop("target")
    config = resolve_target(name, **{k: _tuples(v) for k, v in options.items()})
    if _jsonable(config.to_dict()) != recipe["rewrite"]["target"]:
        raise RecipeMismatchError(f"target config {recipe['rewrite']['target']} does not rebuild "
                                  f"identically here (got {config.to_dict()})")
    return config


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def load(path: str | Path, base_model: nn.Module, *, example_inputs: Any = None,
         verify: bool = False) -> nn.Module:
    """Rebuild a model saved with :func:`save` by replaying its recipe on ``base_model``.

    Args:
        path: the directory :func:`save` wrote.
        base_model: the model the saved one was rewritten from (same architecture and config; its
            weights should be the same too, else a warning names the tensors that differ). It is
            not modified.
        example_inputs: inputs to capture with; default: rebuilt from the recorded shapes/dtypes.
        verify: let :func:`swapformer.rewrite` run its verification on the replay.

    Returns:
        The rewritten model with the saved cores' weights (and changed base weights) loaded; its
        ``swapformer_report`` comes from the replay and its ``swapformer_recipe`` is the recipe.

    Raises:
        InputError: ``path`` holds no recipe, the recipe names a file outside ``path``, or a
            file is missing or unreadable (each names the file). UnknownTargetError: the target
            is not registered.
        RecipeMismatchError: a weight file's sha256 differs from the recorded one, the base
            model's class, config or parameters differ from the recipe's, the replay decided
            differently at some site, or the weights do not fit.
    """
    from swapformer.rewriter.api import rewrite

    recipe = read_recipe(path)
    config = target_config(recipe)
    check_base_model(recipe, base_model)
    check_files(recipe_dir(path), recipe)  # before the replay, the slow step
    inputs = example_inputs if example_inputs is not None else build_inputs(
        recipe["rewrite"]["example_inputs"], base_model)
    log.info("replaying %s on %s", config.name, type(base_model).__name__)
    model = rewrite(base_model, config, example_inputs=inputs, kinds=tuple(recipe["rewrite"]["kinds"]),
                    filter_fn=_replay_filter(recipe["sites"]), verify=verify)
    check_decisions(recipe["sites"], site_decisions(model.swapformer_report))
    _load_weights(model, recipe_dir(path), recipe)
    _check_weights(recipe, model)
    model.swapformer_recipe = recipe
    return model


def _replay_filter(sites: list[dict[str, Any]]) -> Any:
    excluded = {s["name"] for s in sites if s.get("reason") == FILTER_SKIP}
    return lambda site: site.name not in excluded


def check_base_model(recipe: Mapping[str, Any], base_model: nn.Module) -> None:
    """Refuse a base model whose HF config or parameter names/shapes differ from the recipe's.

    Raises:
        InputError: ``base_model`` is not an ``nn.Module``.
        RecipeMismatchError: naming the differing config entries or parameters.
    """
    if not isinstance(base_model, nn.Module):
        raise InputError(f"base_model must be a torch.nn.Module, got {type(base_model).__name__}")
    source = recipe["source"]
    cls = type(base_model)
    here = f"{cls.__module__}.{cls.__qualname__}"
    if source["class"] and source["class"] != here:
        log.warning("the recipe was saved from a %s; the base model is a %s", source["class"], here)
    _check_hf_config(source.get("hf"), base_model)
    skip = excluded_prefixes(recipe["sites"])
    params = base_parameters(base_model, skip)
    if architecture_hash(params) != source["architecture_hash"]:
        raise RecipeMismatchError("the base model's parameters differ from the recipe's: "
                                  + _parameter_diff(source["parameters"], params))


def _check_hf_config(recorded: Mapping[str, Any] | None, base_model: nn.Module) -> None:
    here = hf_identity(base_model)
    if recorded is None or here is None or here["config_hash"] == recorded["config_hash"]:
        return
    old, new = recorded["config"], here["config"]
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    diff = ", ".join(f"{k}: {old.get(k)!r} in the recipe, {new.get(k)!r} here" for k in keys[:6])
    more = f" (and {len(keys) - 6} more)" if len(keys) > 6 else ""
    raise RecipeMismatchError(f"the base model's config differs from the recipe's: {diff}{more}")


def _parameter_diff(recorded: Mapping[str, Any], params: Mapping[str, torch.Tensor]) -> str:
    missing = [n for n in recorded if n not in params]
    extra = [n for n in params if n not in recorded]
    shapes = [f"{n} {tuple(params[n].shape)} vs {tuple(recorded[n][0])} recorded"
              for n in recorded if n in params and list(params[n].shape) != recorded[n][0]]
    parts = []
    for label, names in (("missing here", missing), ("not in the recipe", extra), ("other shape", shapes)):
        if names:
            shown = ", ".join(names[:4]) + (f" (and {len(names) - 4} more)" if len(names) > 4 else "")
            parts.append(f"{len(names)} {label}: {shown}")
    return "; ".join(parts)


def check_decisions(recorded: list[dict[str, Any]], replayed: list[dict[str, Any]]) -> None:
    """Refuse a replay whose sites or per-site decisions differ from the recorded ones.

    Raises:
        RecipeMismatchError: listing the sites that differ.
    """
    keys = ("kind", "decision", "core_name", "core_type", "reason")
    old = {s["name"]: s for s in recorded}
    new = {s["name"]: s for s in replayed}
    problems = [f"site {n} is in the recipe but was not found" for n in old if n not in new]
    problems += [f"site {n} was found but is not in the recipe" for n in new if n not in old]
    for name in old.keys() & new.keys():
        a, b = old[name], new[name]
        changed = [k for k in keys if a.get(k) != b.get(k)]
        if changed:
            what = ", ".join(f"{k} {a.get(k)!r} recorded, {b.get(k)!r} now" for k in changed)
            problems.append(f"site {name}: {what}")
    if problems:
        shown = "; ".join(sorted(problems)[:6]) + (f" (and {len(problems) - 6} more)" if len(problems) > 6 else "")
        raise RecipeMismatchError(f"replaying the recipe gave different sites: {shown}")


def _load_weights(model: nn.Module, path: Path, recipe: Mapping[str, Any]) -> None:
    files = recipe["files"]
    state = read_tensors(recipe_file(path, recipe, "cores"))
    for s in recipe["sites"]:
        if s["decision"] == "replaced":
            _load_core(model, s["core_name"], state)
    leftover = [k for k in state if not any(k.startswith(s.get("core_name", "") + ".")
                                            for s in recipe["sites"] if s["decision"] == "replaced")]
    if leftover:
        raise RecipeMismatchError(f"{files['cores']} holds tensors of no replaced site: {leftover[:4]}")
    host = recipe_file(path, recipe, "host")
    if host is not None:
        _load_host(model, read_tensors(host))


def _load_core(model: nn.Module, core_name: str, state: Mapping[str, torch.Tensor]) -> None:
    prefix = core_name + "."
    core = model.get_submodule(core_name)
    own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    try:
        core.load_state_dict(own, strict=True)
    except RuntimeError as e:
        raise RecipeMismatchError(f"saved weights do not fit core {core_name}: {e}") from e


def _load_host(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    result = model.load_state_dict(dict(state), strict=False)
    if result.unexpected_keys:
        raise RecipeMismatchError(f"saved base weights name tensors the model lacks: {result.unexpected_keys[:4]}")


def _check_weights(recipe: Mapping[str, Any], model: nn.Module) -> None:
    """Warn when the base weights differ from those the recipe was saved with."""
    recorded = recipe["source"].get("weights") or {}
    params = base_parameters(model, excluded_prefixes(recipe["sites"]))
    dtypes = {n: d for n, (_, d) in recipe["source"]["parameters"].items()}
    differ = [n for n, p in params.items() if n in recorded and _dtype_name(p.dtype) == dtypes.get(n)
              and tensor_digest(p) != recorded[n]]
    if differ:
        shown = ", ".join(differ[:4]) + (f" (and {len(differ) - 4} more)" if len(differ) > 4 else "")
        warnings.warn(f"{len(differ)} base weights differ from those the recipe was saved with "
                      f"(a different checkpoint?): {shown}", stacklevel=3)


# Hugging Face directories


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
    if not _is_hf(model):
        raise InputError("save_pretrained needs a Hugging Face model; use swapformer.save for others")
    sites = site_decisions(_report_of(model))
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
