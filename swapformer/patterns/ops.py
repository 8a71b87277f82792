"""Canonical names for graph nodes, so detectors read one vocabulary whatever the capture.

``torch.export`` gives ATen ops (``aten.matmul.default``), ``torch.fx.symbolic_trace`` and Dynamo give
torch-level calls (``operator.matmul``, ``torch.bmm``, ``Tensor.softmax`` as a method). Each spelling is
listed here once as data; :func:`canonical` maps a node to its canonical name and :func:`arg` reads an
argument by position or keyword.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

aten = torch.ops.aten


def _overloads(*packets: Any) -> list[Any]:
    out: list[Any] = []
    for packet in packets:
        out.append(packet)
        out += [getattr(packet, name) for name in packet.overloads()]
    return out


# canonical name -> (torch-level callables, method names, aten op packets)
_SPELLINGS: dict[str, tuple[tuple[Any, ...], tuple[str, ...], tuple[Any, ...]]] = {
    "matmul": ((operator.matmul, torch.matmul, torch.bmm, torch.mm), ("matmul", "bmm", "mm"),
               (aten.matmul, aten.bmm, aten.mm)),
    "baddbmm": ((torch.baddbmm,), ("baddbmm",), (aten.baddbmm,)),
    "einsum": ((torch.einsum,), (), (aten.einsum,)),
    "softmax": ((torch.softmax, F.softmax), ("softmax",), (aten.softmax, aten._softmax, aten._safe_softmax)),
    "sdpa": ((F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention), (),
             (aten.scaled_dot_product_attention,)),
    "linear": ((F.linear, torch._C._nn.linear), (), (aten.linear,)),
    "addmm": ((torch.addmm,), (), (aten.addmm,)),
    "transpose": ((torch.transpose,), ("transpose",), (aten.transpose,)),
    "permute": ((torch.permute,), ("permute",), (aten.permute,)),
    "t": ((torch.t,), ("t",), (aten.t,)),
    "view": ((torch.reshape,), ("view", "reshape"), (aten.view, aten.reshape, aten._unsafe_view)),
    "expand": ((), ("expand",), (aten.expand,)),
    "unsqueeze": ((torch.unsqueeze,), ("unsqueeze",), (aten.unsqueeze,)),
    "squeeze": ((torch.squeeze,), ("squeeze",), (aten.squeeze,)),
    "repeat_interleave": ((torch.repeat_interleave,), ("repeat_interleave",), (aten.repeat_interleave,)),
    "getitem": ((operator.getitem,), (), ()),
    "split": ((torch.split,), ("split",), (aten.split, aten.split_with_sizes)),
    "chunk": ((torch.chunk,), ("chunk",), (aten.chunk,)),
    "unbind": ((torch.unbind,), ("unbind",), (aten.unbind,)),
    "slice": ((), (), (aten.slice,)),
    "select": ((torch.select,), ("select",), (aten.select,)),
    "identity": ((), ("contiguous", "clone", "detach"), (aten.contiguous, aten.clone, aten.alias,
                                                         aten.detach, aten.lift_fresh_copy)),
    "to": ((), ("to", "float", "half", "bfloat16", "double", "type_as", "type"),
           (aten.to, aten._to_copy, aten.type_as)),
    "dropout": ((F.dropout, torch.dropout), (), (aten.dropout, aten.native_dropout)),
    "mul": ((operator.mul, torch.mul), ("mul",), (aten.mul,)),
    "div": ((operator.truediv, torch.div), ("div",), (aten.div,)),
    "add": ((operator.add, torch.add), ("add",), (aten.add,)),
    "sub": ((operator.sub, torch.sub), ("sub",), (aten.sub,)),
    "neg": ((operator.neg, torch.neg), ("neg",), (aten.neg,)),
    "masked_fill": ((torch.masked_fill,), ("masked_fill",), (aten.masked_fill,)),
    # in-place forms (``scores += bias``, ``scores *= s``): see INPLACE
    "add_": ((operator.iadd,), ("add_",), (aten.add_,)),
    "sub_": ((operator.isub,), ("sub_",), (aten.sub_,)),
    "mul_": ((operator.imul,), ("mul_",), (aten.mul_,)),
    "div_": ((operator.itruediv,), ("div_",), (aten.div_,)),
    "masked_fill_": ((), ("masked_fill_",), (aten.masked_fill_,)),
    "where": ((torch.where,), ("where",), (aten.where,)),
    "tanh": ((torch.tanh, F.tanh), ("tanh",), (aten.tanh,)),
    "gelu": ((F.gelu, torch._C._nn.gelu), (), (aten.gelu,)),
    "relu": ((F.relu, torch.relu), ("relu",), (aten.relu,)),
    "silu": ((F.silu, torch._C._nn.silu), (), (aten.silu,)),
    "sigmoid": ((torch.sigmoid, F.sigmoid), ("sigmoid",), (aten.sigmoid,)),
    "erf": ((torch.erf,), ("erf",), (aten.erf,)),
    "pow": ((torch.pow, operator.pow), ("pow",), (aten.pow,)),
    "cat": ((torch.cat,), (), (aten.cat,)),
    "stack": ((torch.stack,), (), (aten.stack,)),
    "rsqrt": ((torch.rsqrt,), ("rsqrt",), (aten.rsqrt,)),
    "sqrt": ((torch.sqrt,), ("sqrt",), (aten.sqrt,)),
    "mean": ((torch.mean,), ("mean",), (aten.mean,)),
    "rms_norm": ((F.rms_norm,), (), (aten.rms_norm,)),
    "layer_norm": ((F.layer_norm,), (), (aten.layer_norm,)),
    "view_as_complex": ((torch.view_as_complex,), (), (aten.view_as_complex,)),
    "flatten": ((torch.flatten,), ("flatten",), (aten.flatten,)),
    "unflatten": ((torch.unflatten,), ("unflatten",), (aten.unflatten,)),
}

# in-place op -> its functional twin: the same value when nothing else reads the tensor it overwrites
INPLACE = {"add_": "add", "sub_": "sub", "mul_": "mul", "div_": "div", "masked_fill_": "masked_fill"}

_FUNCTIONS: dict[Any, str] = {}
_METHODS: dict[str, str] = {}
for _name, (_fns, _methods, _packets) in _SPELLINGS.items():
    for _fn in _fns:
        _FUNCTIONS[_fn] = _name
    for _m in _methods:
        _METHODS[_m] = _name
    for _op in _overloads(*_packets):
        _FUNCTIONS[_op] = _name

# nn.Module leaves as they appear under torch.fx.symbolic_trace
_MODULES: dict[type, str] = {
    torch.nn.Linear: "linear",
    torch.nn.Dropout: "dropout",
    torch.nn.GELU: "gelu",
    torch.nn.ReLU: "relu",
    torch.nn.SiLU: "silu",
    torch.nn.Tanh: "tanh",
    torch.nn.Sigmoid: "sigmoid",
    torch.nn.Softmax: "softmax",
    torch.nn.LayerNorm: "layer_norm",
    torch.nn.Identity: "identity",
}
if hasattr(torch.nn, "RMSNorm"):
    _MODULES[torch.nn.RMSNorm] = "rms_norm"

# ops that only move or re-label data: safe to walk through when tracing where a tensor came from
SHAPE_OPS = frozenset({"transpose", "permute", "t", "view", "expand", "unsqueeze", "squeeze", "identity",
                       "getitem", "split", "chunk", "unbind", "slice", "select", "flatten",
                       "unflatten", "to"})
ELEMENTWISE_OPS = frozenset({"mul", "div", "add", "sub", "neg", "tanh", "gelu", "relu", "silu",
                             "sigmoid", "erf", "pow", "to", "dropout", "identity"})
ACTIVATIONS = frozenset({"gelu", "relu", "silu", "tanh", "sigmoid", "erf"})


def canonical(node: fx.Node, gm: fx.GraphModule | None = None) -> str | None:
    """The canonical op name of ``node``, or None for placeholders, attributes and unknown ops."""
    if node.op == "call_function":
        try:
            return _FUNCTIONS.get(node.target)
        except TypeError:  # unhashable target
            return None
    if node.op == "call_method":
        return _METHODS.get(node.target)
    if node.op == "call_module" and gm is not None:
        mod = gm.get_submodule(node.target)
        for cls, name in _MODULES.items():
            if type(mod) is cls:
                return name
    return None


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``index`` (positional) or ``name`` (keyword) of a call node."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def is_scalar(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
