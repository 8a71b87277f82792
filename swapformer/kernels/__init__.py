"""Efficient kernels behind the swap targets, one package per operator (fla layout ``[B, T, H, D]``;
``window/`` takes the attention targets' ``[B, H, T, D]``, whose callers hold that layout).

Each ``<op>/`` has ``naive.py`` (pure PyTorch reference, the spec), ``op.py`` (``torch.library`` custom
ops with fake and autograd registrations) and ``triton.py`` (kernels and launchers, imported lazily, so
this package imports without triton and never initialises CUDA).
"""

from swapformer.kernels.cat import cat_attention, cat_attention_flex, naive_cat_attention
from swapformer.kernels.elita import elita_attention, naive_elita_attention
from swapformer.kernels.fastweight import (
    fastweight_decay,
    fastweight_decay_recurrent,
    naive_fastweight_decay_chunked,
    naive_fastweight_decay_recurrent,
)
from swapformer.kernels.window import naive_window_attention, window_attention
from swapformer.kernels.worker import (
    causal_dwconv,
    causal_dwconv_gather,
    naive_causal_dwconv,
    naive_worker_attention,
    worker_attention,
)

__all__ = [
    "cat_attention",
    "cat_attention_flex",
    "causal_dwconv",
    "causal_dwconv_gather",
    "elita_attention",
    "fastweight_decay",
    "fastweight_decay_recurrent",
    "naive_cat_attention",
    "naive_causal_dwconv",
    "naive_elita_attention",
    "naive_fastweight_decay_chunked",
    "naive_fastweight_decay_recurrent",
    "naive_window_attention",
    "naive_worker_attention",
    "window_attention",
    "worker_attention",
]
