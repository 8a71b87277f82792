"""Test helpers for swapformer users: exactness checks and hypothesis strategies.

* :func:`assert_rewrite_exact` rewrites a model and checks that its outputs did not move;
  :func:`assert_same_outputs` and :func:`check_equivalence` compare two models directly.
* :func:`assert_sites_match` compares detected sites with expected field values.
* :func:`attention_programs` and :func:`ffn_programs` generate small modules from a grammar of the
  spellings swapformer detects, each with the site fields detection must report;
  :func:`input_tensors` draws example tensors.

swapformer's API and hypothesis are imported inside the functions that need them, so importing this
module costs nothing and works without hypothesis installed.

The grammar's axes (``PROJECTIONS``, ``MASKS``, ``SCORE_MODS``, ``FFN_ACTIVATIONS``, ...) are exported too:
they are the values ``attention_programs`` and ``ffn_programs`` accept.

Layout: ``asserts`` (output and site checks), ``models`` (the grammar modules), ``strategies``
(hypothesis strategies over them).
"""

from swapformer.testing.asserts import (
    assert_rewrite_exact,
    assert_same_outputs,
    assert_sites_match,
    call_model,
    check_equivalence,
)
from swapformer.testing.models import (
    EXTRAS,
    FFN_ACTIVATIONS,
    FFN_GATINGS,
    FFN_SPELLINGS,
    GQA_FORMS,
    HEAD_LAYOUTS,
    MASKS,
    PROJECTIONS,
    SCALE_PLACEMENTS,
    SCORE_MODS,
    SOFTMAX_DTYPES,
    AttentionChoices,
    FFNChoices,
    Program,
    attention_program,
    ffn_program,
)
from swapformer.testing.strategies import attention_programs, ffn_programs, input_tensors

__all__ = [
    "EXTRAS",
    "FFN_ACTIVATIONS",
    "FFN_GATINGS",
    "FFN_SPELLINGS",
    "GQA_FORMS",
    "HEAD_LAYOUTS",
    "MASKS",
    "PROJECTIONS",
    "SCALE_PLACEMENTS",
    "SCORE_MODS",
    "SOFTMAX_DTYPES",
    "AttentionChoices",
    "FFNChoices",
    "Program",
    "assert_rewrite_exact",
    "assert_same_outputs",
    "assert_sites_match",
    "attention_program",
    "attention_programs",
    "call_model",
    "check_equivalence",
    "ffn_program",
    "ffn_programs",
    "input_tensors",
]
