"""Decoding state of converted Hugging Face models, held in transformers' own ``Cache``.

A replaced attention layer keeps exactly its target's state (window: sinks + window keys; fastweight /
elita: the fixed-size memory; cat: compressed slots + the current chunk; worker: its conv'd keys and
values) in a :class:`CoreStateLayer` of a :class:`SwapformerCache`, and no host K/V beside it: its
``update`` hands this call's keys and values to the core and stores nothing. Layers the rewrite did
not replace keep the layer the host's cache would have had (dynamic, sliding or static).

The cache is created for the user: a forward pre-hook on the model puts a ``SwapformerCache`` in
place of no cache (``use_cache=True``) or of an empty host cache (what ``generate()`` makes, dynamic or
static); a host cache that already holds tokens cannot be converted and is refused.

Positions and padding come from the 2-D key-padding mask, never from tensor shapes: when a call has
padding, each sequence runs through the core on its real tokens only, with a state of its own, so
left and right padding give each sequence exactly what it gives alone. A batch without padding runs
in one call with one batched state.

A model whose every cache layer is a worker core repeats the last token of each call that uses the
cache (the last ``logits_to_keep`` tokens when more are asked for) as transient workers that the cores
do not store, and drops the stored copies from its outputs (``targets/worker.py``, "Decoding"); the
innermost model does it, so outputs and ``logits_to_keep`` keep the call's length. The same hooks put
each call's token positions over real tokens in the call context for position-dependent FFN cores.

What ``generate()`` relies on is implemented on the states: ``reorder_cache`` (beams),
``batch_select_indices`` / ``batch_repeat_interleave``, ``reset``, ``get_seq_length`` and ``crop``.
Fixed-size states cannot be cut back, so a call of several tokens keeps the state from before its
last :data:`REPLAY_TOKENS` tokens plus those tokens' core inputs; ``crop`` restores that state and
replays the kept tokens (assisted and prompt-lookup decoding crop only inside their last call). The
next single-token call drops that buffer, so a decoding cache holds the target's state alone; with
gradients enabled (training) nothing is kept for replay.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from swapformer.errors import InputError

log = logging.getLogger(__name__)

# how far back ``crop`` can go: the tail of a multi-token call that is kept for replay
REPLAY_TOKENS = 64
CACHE_ARGUMENTS = ("cache", "past_key_values")  # the forward parameter a new cache is passed under


def _transformers_cache() -> tuple[type, type, type]:
    from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer

    return Cache, CacheLayerMixin, DynamicLayer


def _map_state(state: dict, fn: Callable[[torch.Tensor], torch.Tensor]) -> dict:
    """Apply ``fn`` to every tensor of a state (dim 0 is the batch, by the targets' convention)."""
    return {k: fn(v) if isinstance(v, torch.Tensor) else v for k, v in state.items()}


@dataclasses.dataclass(frozen=True)
class _Prefix:
    """A replay snapshot's entry that is the first ``length`` rows (dim 1) of the state's tensor."""

    length: int


def _share_prefixes(snapshot: dict | None, state: dict | None) -> dict | None:
    """``snapshot`` (the state before a call's tail) with every tensor that the tail only appended to
    replaced by a :class:`_Prefix` of the state after it: a growing state (the worker's keys and
    values) is then not held twice for a crop that may never come (+360 MiB after an 8k prefill)."""
    if snapshot is None or state is None:
        return snapshot
    shared = {}
    for key, old in snapshot.items():
        new = state.get(key)
        grown = (isinstance(old, torch.Tensor) and isinstance(new, torch.Tensor) and new is not old
                 and old.dim() >= 2 and new.shape[:1] + new.shape[2:] == old.shape[:1] + old.shape[2:]
                 and new.shape[1] > old.shape[1])
        shared[key] = _Prefix(old.shape[1]) if grown and torch.equal(new[:, :old.shape[1]], old) else old
    return shared


def _restore(snapshot: dict, state: dict) -> dict:
    """The state a :func:`_share_prefixes` snapshot stands for (``state``: the one after the tail)."""
    return {k: state[k][:, :v.length].clone() if isinstance(v, _Prefix) else v for k, v in snapshot.items()}


def state_nbytes(state: dict) -> int:
    return sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))


@dataclasses.dataclass
class CoreCall:
    """The core inputs of one sequence (or of the whole batch) for one call, ``[B, H, T, D]`` etc."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    hidden: torch.Tensor | None
    # the last rows repeat as many tokens before them, transients the core must not store (worker)
    transients: int = 0

    def tokens(self, start: int, end: int | None = None) -> CoreCall:
        """Rows ``start:end``; a slice that ends before the repeats has none (never cut through them)."""
        sl = slice(start, end)
        hidden = self.hidden[:, sl] if self.hidden is not None else None
        transients = self.transients if end is None or end >= self.length else 0
        return CoreCall(self.q[:, :, sl], self.k[:, :, sl], self.v[:, :, sl], hidden, transients)

    def copy(self) -> CoreCall:
        """The same rows in tensors of their own: a kept slice would keep the whole call's alive."""
        hidden = self.hidden.clone() if self.hidden is not None else None
        return CoreCall(self.q.clone(), self.k.clone(), self.v.clone(), hidden, self.transients)

    @property
    def length(self) -> int:
        return self.q.shape[-2]

    @property
    def stored(self) -> int:
        """The tokens that enter the state (the transient repeat does not)."""
        return self.length - self.transients


def run_core(core: nn.Module, call: CoreCall, state: dict | None) -> torch.Tensor:
    kwargs: dict[str, Any] = {"state": state} if state is not None else {}
    if call.transients:
        kwargs["transients"] = call.transients
    return core(call.q, call.k, call.v, None, hidden=call.hidden, **kwargs)


def _build_layer_class() -> type:
    _, CacheLayerMixin, _ = _transformers_cache()

    class CoreStateLayer(CacheLayerMixin):
        """The cache layer of a replaced attention: the target's state, no keys or values."""

        is_sliding = False
        is_compileable = False
        supports_early_init = False

        def __init__(self) -> None:
            super().__init__()
            self.is_initialized = True
            self.seq_len = 0
            self.state: dict = {}  # batched state while no call had padding
            self.rows: list[dict] | None = None  # one state per sequence once a call had padding
            self.replay: tuple[Any, Any] | None = None  # (state(s) before the tail, tail call(s))
            self.record_past = False

        def __repr__(self) -> str:
            return f"CoreStateLayer(seq_len={self.seq_len}, bytes={self.nbytes()})"

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            return None

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
                   **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            # the core consumes this call's keys and values into its own state; nothing is stored here
            self.seq_len += key_states.shape[-2]
            return key_states, value_states

        def get_seq_length(self, *args: Any) -> int:
            return self.seq_len

        def get_mask_sizes(self, query_length: int, *args: Any) -> tuple[int, int]:
            # the host mask a dynamic layer would get; the core reads padding from the 2-D mask instead
            return self.seq_len + query_length, 0

        def get_max_length(self) -> int:
            return -1

        def get_max_cache_shape(self) -> int:
            return -1

        def nbytes(self) -> int:
            states = self.rows if self.rows is not None else [self.state]
            return sum(state_nbytes(s) for s in states)

        def reset(self) -> None:
            self.seq_len, self.state, self.rows, self.replay = 0, {}, None, None

        def offload(self) -> None:
            return None

        def prefetch(self) -> None:
            return None

        def activate_past_recording(self) -> None:
            self.record_past = True

        @property
        def is_croppable(self) -> bool:
            return True

        def _select(self, index: torch.Tensor) -> None:
            if self.rows is not None:
                self.rows = [dict(self.rows[int(i)]) for i in index.tolist()]
            else:
                self.state = _map_state(self.state, lambda t: t.index_select(0, index.to(t.device)))
            self.replay = None  # a replay would restore the old batch order

        def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
            self._select(beam_idx)

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            self._select(torch.as_tensor(indices).flatten())

        def batch_repeat_interleave(self, repeats: int) -> None:
            n = len(self.rows) if self.rows is not None else _state_batch(self.state)
            if n:
                self._select(torch.arange(n).repeat_interleave(repeats))

        def crop(self, tokens_to_remove: int) -> None:
            # transformers >= 5.2x passes -n (remove n); older versions pass the length to keep
            target = self.seq_len + tokens_to_remove if tokens_to_remove < 0 else tokens_to_remove
            drop = self.seq_len - target
            if tokens_to_remove == 0 or drop == 0:
                return
            tails = [] if self.replay is None else self.replay[1]
            tails = tails if isinstance(tails, list) else [tails]
            if not tails or not 0 < drop <= min(t.stored for t in tails):
                raise InputError(
                    f"cannot crop a swapformer cache from {self.seq_len} to {target} tokens: a target "
                    f"state can only be rolled back inside the last {REPLAY_TOKENS} tokens of its last call"
                )
            self.rollback(drop)

        def rollback(self, drop: int) -> None:
            """Restore the state from before the last call's tail and replay all but ``drop`` tokens."""
            states, tails = self.replay
            if self.rows is None:
                self.state = _restore(states, self.state)
                if tails.stored > drop:
                    run_core(self.core, tails.tokens(0, tails.stored - drop), self.state)
            else:
                self.rows = [_restore(s, row) for s, row in zip(states, self.rows)]
                for row, call in zip(self.rows, tails):
                    if call.stored > drop:
                        run_core(self.core, call.tokens(0, call.stored - drop), row)
            self.seq_len, self.replay = self.seq_len - drop, None

    return CoreStateLayer


def _state_batch(state: dict) -> int:
    return next((v.shape[0] for v in state.values() if isinstance(v, torch.Tensor)), 0)


_LAYER_CLASS: type | None = None


def core_state_layer() -> type:
    global _LAYER_CLASS
    if _LAYER_CLASS is None:
        _LAYER_CLASS = _build_layer_class()
    return _LAYER_CLASS


def _build_cache_class() -> type:
    Cache, _, DynamicLayer = _transformers_cache()

    class SwapformerCache(Cache):
        """Host cache layers where the host's attention runs; :class:`CoreStateLayer` where a core does."""

        def __init__(self, layers: list) -> None:
            super().__init__(layers=layers)

        @classmethod
        def for_model(cls, cores: dict[int, nn.Module], num_layers: int, template: Any = None):
            host = list(getattr(template, "layers", []) or [])
            layers = []
            for i in range(num_layers):
                if i in cores:
                    layer = core_state_layer()()
                    layer.core = cores[i]
                else:
                    layer = host[i] if i < len(host) else DynamicLayer()
                layers.append(layer)
            return cls(layers)

        def core_layers(self) -> list:
            return [layer for layer in self.layers if isinstance(layer, core_state_layer())]

        def nbytes(self) -> int:
            """Bytes held by the cache: target states plus host keys/values of unreplaced layers."""
            return cache_nbytes(self)

    return SwapformerCache


_CACHE_CLASS: type | None = None


def cache_nbytes(cache: Any) -> int:
    """Bytes a transformers cache holds: keys/values of host layers, states of swapformer layers."""
    total = 0
    for layer in getattr(cache, "layers", []):
        if isinstance(layer, core_state_layer()):
            total += layer.nbytes()
            continue
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def swapformer_cache_class() -> type:
    global _CACHE_CLASS
    if _CACHE_CLASS is None:
        _CACHE_CLASS = _build_cache_class()
    return _CACHE_CLASS


# --- running a core against its cache layer --------------------------------------------------------


def call_core(core: nn.Module, call: CoreCall, keep: torch.Tensor | None, layer: Any) -> torch.Tensor:
    """The core's output ``[B, H, T, Dv]`` for this call, reading and updating ``layer``'s state.

    ``keep`` ``[B, T]`` marks real tokens (None: all real). ``layer`` is None for a call without a
    cache (a full forward).
    """
    if layer is not None:
        layer.seq_len -= call.transients  # ``update`` counted the repeats, which are not kept
    if layer is None:
        if keep is None:
            return run_core(core, call, None)
        return _per_sequence(core, call, keep, [None] * call.q.shape[0])
    if keep is None and layer.rows is None:
        return _batched_with_replay(core, call, layer)
    if layer.rows is None:  # first padded call: from now on every sequence has its own state
        b = call.q.shape[0]
        layer.rows = [_map_state(layer.state, lambda t, i=i: t[i:i + 1]) for i in range(b)]
        layer.state = {}
    return _per_sequence(core, call, keep, layer.rows, layer)


def _batched_with_replay(core: nn.Module, call: CoreCall, layer: Any) -> torch.Tensor:
    t = call.stored
    layer.replay = None
    if t == 1 or torch.is_grad_enabled():  # no rollback while training: keep the graph whole
        return run_core(core, call, layer.state)
    split = max(0, t - REPLAY_TOKENS)
    outs = [run_core(core, call.tokens(0, split), layer.state)] if split else []
    tail = call.tokens(split)
    before, kept = dict(layer.state), tail.copy()
    outs.append(run_core(core, tail, layer.state))
    layer.replay = (_share_prefixes(before, layer.state), kept)
    return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]


def _per_sequence(core: nn.Module, call: CoreCall, keep: torch.Tensor | None, states: list,
                  layer: Any = None) -> torch.Tensor:
    """Each sequence alone on its real tokens (padding never reaches the core); zeros at pads."""
    b, _, t, _ = call.q.shape
    outs, snapshots, tails = [], [], []
    replayable = call.stored > 1 and layer is not None and not torch.is_grad_enabled()
    for i in range(b):
        idx = torch.arange(t, device=call.q.device) if keep is None else keep[i].nonzero().flatten()
        # the repeats of padding are padding; a row whose repeats are all padding (right padding)
        # runs as a plain call: its last real token is then a stored worker, as in the full forward
        repeats = call.transients if keep is None else int(keep[i, t - call.transients:].sum())
        row = CoreCall(call.q[i:i + 1, :, idx], call.k[i:i + 1, :, idx], call.v[i:i + 1, :, idx],
                       None if call.hidden is None else call.hidden[i:i + 1, idx], repeats)
        split = max(0, row.stored - REPLAY_TOKENS) if replayable else row.length
        pieces = [run_core(core, row.tokens(0, split), states[i])] if split else []
        snapshots.append(dict(states[i]) if states[i] is not None else None)
        tail = row.tokens(split)
        tails.append(tail.copy() if replayable else tail)
        if split < row.length:
            pieces.append(run_core(core, tail, states[i]))
            snapshots[-1] = _share_prefixes(snapshots[-1], states[i])
        out = torch.cat(pieces, dim=2) if pieces else call.q.new_zeros(1, call.q.shape[1], 0, call.v.shape[-1])
        full = out.new_zeros(1, out.shape[1], t, out.shape[-1])
        full[:, :, idx] = out
        outs.append(full)
    if layer is not None:
        layer.replay = (snapshots, tails) if replayable else None
    return torch.cat(outs, dim=0)


# --- creating the cache for the user ----------------------------------------------------------------


def stateful_layers(model: nn.Module) -> dict[int, nn.Module]:
    """``layer_idx -> core`` for every attention module whose core keeps a decoding state."""
    layers = {}
    for module in model.modules():
        core = getattr(module, "swapformer_core", None)
        if core is not None and getattr(core, "stateful", False):
            layers[module.layer_idx] = core
    return layers


def find_cache(values: Any) -> Any:
    Cache, _, _ = _transformers_cache()
    return next((v for v in values if isinstance(v, Cache)), None)


def install(model: nn.Module, context: dict) -> None:
    """Give the model (and every inner model that takes a cache) the pre-hook that creates the cache,
    the innermost such model (the one that runs the layers) the hooks that prepare each call's tokens,
    and every module that reads the call context (FFN swaps) that context."""
    from transformers import PreTrainedModel

    hosts = [m for m in model.modules() if isinstance(m, PreTrainedModel) and _cache_parameter(m) is not None]
    for module in hosts:
        module.register_forward_pre_hook(_model_pre_hook, with_kwargs=True)
        module._swapformer_call = context
        if not any(inner is not module for inner in module.modules() if inner in hosts):
            module.register_forward_pre_hook(_prepare_tokens, with_kwargs=True)
            module.register_forward_hook(_finish_tokens, with_kwargs=True, always_call=True)
    for module in model.modules():
        if isinstance(getattr(module, "_swapformer_call", None), dict):
            module._swapformer_call = context


def _signature(module: nn.Module) -> inspect.Signature:
    # read once per model class: the hook runs on every forward, decode steps included
    return _SIGNATURES.setdefault(type(module), inspect.signature(module.forward))


_SIGNATURES: dict[type, inspect.Signature] = {}


def _cache_parameter(module: nn.Module) -> str | None:
    params = _signature(module).parameters
    return next((n for n in CACHE_ARGUMENTS if n in params), None)


def _model_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    bound = _signature(module).bind_partial(*args, **kwargs).arguments
    context = module._swapformer_call
    cores = stateful_layers(module)
    cache = find_cache(list(bound.values()) + list(kwargs.values()))
    mask = bound.get("attention_mask")
    keep = mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
    # read once per forward (a GPU sync), not once per layer: None when every token is real
    context["keep"] = None if keep is None or bool(keep.all()) else keep
    logits_to_keep = bound.get("logits_to_keep")
    if isinstance(logits_to_keep, int) and logits_to_keep > 1:
        context["logits_asked"] = logits_to_keep  # read by the inner model's ``_prepare_tokens``
    if not cores:
        context["cache"] = cache
        return args, kwargs
    use_cache = bound.get("use_cache")
    if use_cache is None:
        use_cache = getattr(module.config, "use_cache", False)
    new = _own_cache(module, cores, cache, bool(use_cache))
    if new is not cache:
        name = _argument_holding(bound, cache) or _cache_parameter(module)
        args, kwargs = _replace_argument(module, args, kwargs, name, new)
    context["cache"] = new
    return args, kwargs


def _own_cache(module: nn.Module, cores: dict, cache: Any, use_cache: bool) -> Any:
    cls = swapformer_cache_class()
    if isinstance(cache, cls) or (cache is None and not use_cache):
        return cache
    if cache is not None and cache.get_seq_length() > 0:
        raise InputError(
            f"the model's attention was replaced by swapformer cores that keep their own decoding state, "
            f"but it was given a {type(cache).__name__} that already holds {cache.get_seq_length()} tokens "
            "of host keys/values; pass no cache (one is created) or the cache a previous call returned"
        )
    config = module.config.get_text_config(decoder=True)
    return cls.for_model(cores, config.num_hidden_layers, template=cache)


# --- the worker's repeated last token ---------------------------------------------------------------


def _prepare_tokens(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Put this call's token positions (over real tokens) in the context and, where the cores ask
    for it (worker), repeat the call's last token (the last ``logits_to_keep`` ones when the caller
    asked for more logits: assisted decoding) as transients that the cores do not store."""
    context = module._swapformer_call
    repeats = context.pop("logits_asked", 1)
    bound = _signature(module).bind_partial(*args, **kwargs).arguments
    tokens = next((bound[n] for n in ("input_ids", "inputs_embeds") if bound.get(n) is not None), None)
    if tokens is None:
        return None
    b, t = tokens.shape[:2]
    repeats = min(repeats, t)
    mask, cache = bound.get("attention_mask"), context.get("cache")
    past = cache.get_seq_length() if cache is not None else 0
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[-1] >= t:
        keep = mask[:, -t:].bool()
        positions = (mask.long().cumsum(-1) - 1)[:, -t:]
    else:
        keep, positions = None, torch.arange(past, past + t, device=tokens.device).expand(b, t)
    if not _carries_last_token(module, cache, mask):
        context["positions"], context["tokens_keep"] = positions, keep
        return None
    if mask is None:
        mask = torch.ones(b, past + t, dtype=torch.long, device=tokens.device)
    position_ids = bound.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(past, past + t, device=tokens.device)[None]
    new = {"input_ids" if tokens is bound.get("input_ids") else "inputs_embeds": _repeat_last(tokens, repeats),
           "attention_mask": _repeat_last(mask, repeats), "position_ids": _repeat_last(position_ids, repeats)}
    cache_position = bound.get("cache_position", kwargs.get("cache_position"))
    if cache_position is None and "cache_position" in _signature(module).parameters:
        cache_position = torch.arange(past, past + t, device=tokens.device)
    if cache_position is not None:  # older transformers take cache_position beside position_ids
        new["cache_position"] = _repeat_last(cache_position, repeats, dim=-1)
    for name, value in new.items():
        args, kwargs = _set_argument(module, args, kwargs, name, value)
    keep = None if keep is None else _repeat_last(keep, repeats)
    context.update(positions=_repeat_last(positions, repeats), tokens_keep=keep, transients=repeats,
                   keep=new["attention_mask"].bool())
    return args, kwargs


def _finish_tokens(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    """Drop the stored copies of the repeated tokens from the outputs: callers see the call's
    tokens, the repeated ones computed as transient workers."""
    context = module._swapformer_call
    repeats = context.pop("transients", 0)
    positions = context.pop("positions", None)
    context.pop("tokens_keep", None)
    if not repeats or output is None:
        return output
    length = positions.shape[-1]
    if isinstance(output, dict):  # a ModelOutput
        for name, value in list(output.items()):
            output[name] = _drop_stored_copies(value, length, repeats)
        return output
    return _drop_stored_copies(output, length, repeats)


def _drop_stored_copies(value: Any, length: int, repeats: int) -> Any:
    """Hidden states ``[B, T+m, ...]`` (or tuples of them) without rows ``T-m .. T-1``."""
    if isinstance(value, tuple):
        return type(value)(_drop_stored_copies(v, length, repeats) for v in value)
    if isinstance(value, torch.Tensor) and value.dim() >= 3 and value.shape[1] == length:
        return torch.cat([value[:, :length - 2 * repeats], value[:, length - repeats:]], dim=1)
    return value


def _repeat_last(x: torch.Tensor, repeats: int, dim: int = 1) -> torch.Tensor:
    return torch.cat([x, x.narrow(dim, x.shape[dim] - repeats, repeats)], dim=dim)


def _carries_last_token(module: nn.Module, cache: Any, mask: Any) -> bool:
    """Whether this call repeats its last token: the model has cores that ask for it (worker) and
    every layer of the cache is such a core.

    A host layer would store the repeat, so a partly converted model (worker FFN under host
    attention included) decodes without it, approximately: the decoded token's worker keys/values
    stay in deeper layers. Warned once."""
    if cache is None or not _wants_repeats(module):
        return False
    exact = isinstance(cache, swapformer_cache_class()) and all(
        getattr(getattr(layer, "core", None), "carries_last_token", False) for layer in cache.layers)
    exact = exact and (mask is None or (isinstance(mask, torch.Tensor) and mask.dim() == 2))
    if not exact and not getattr(module, "_swapformer_warned_approximate", False):
        module._swapformer_warned_approximate = True
        log.warning(
            "%s: some attention layers are not worker cores (or the mask is not 2-D), so worker decoding "
            "with the cache is approximate: a decoded token keeps its transient-worker keys/values in "
            "deeper layers", type(module).__name__,
        )
    return exact


def _wants_repeats(module: nn.Module) -> bool:
    """Whether a core of the model (attention or FFN) asks for repeated last tokens; read once, the
    cores are fixed by the rewrite."""
    wants = getattr(module, "_swapformer_wants_repeats", None)
    if wants is None:
        wants = any(getattr(getattr(m, name, None), "carries_last_token", False)
                    for m in module.modules() for name in ("swapformer_core", "core"))
        module._swapformer_wants_repeats = wants
    return wants


def _set_argument(module: nn.Module, args: tuple, kwargs: dict, name: str, value: Any) -> tuple[tuple, dict]:
    params = list(_signature(module).parameters)
    position = params.index(name) if name in params else None
    if position is not None and position < len(args):
        return args[:position] + (value,) + args[position + 1:], kwargs
    return args, {**kwargs, name: value}


def _argument_holding(bound: dict, value: Any) -> str | None:
    if value is None:
        return None
    return next((n for n, v in bound.items() if v is value), None)


def _replace_argument(module: nn.Module, args: tuple, kwargs: dict, name: str, value: Any):
    params = list(_signature(module).parameters)
    position = params.index(name) if name in params else None
    if position is not None and position < len(args):
        args = args[:position] + (value,) + args[position + 1:]
    else:
        kwargs = {**{k: v for k, v in kwargs.items() if k not in CACHE_ARGUMENTS}, name: value}
    return args, kwargs
