"""Save a rewritten model as a recipe plus its cores' weights, and rebuild it by replaying the recipe.

A converted model is stored the PEFT way, as what is new relative to its base model:

* ``swapformer.json``: the recipe: the base model's identity (class, Hugging Face ``model_type``
  and ``_name_or_path``, a hash of its config, the names and shapes of its parameters and a hash of
  them, a digest of each parameter's values), the target config (``config.to_dict()``, rebuilt only
  through the target registry) or, for a model rewritten by a :class:`~swapformer.Plan`, the plan
  (every site's config and reason), the site kinds, the example inputs' shapes and dtypes, every site's
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

Layout: ``recipe`` (the format, reading it back), ``hashing`` (base-model identity, digests),
``inputs`` (example-input records), ``weights`` (cores and changed base weights), ``save``, ``load``,
``pretrained`` (Hugging Face directories).
"""

from swapformer.checkpoint.inputs import build_inputs, describe_inputs
from swapformer.checkpoint.load import load
from swapformer.checkpoint.pretrained import from_pretrained, save_pretrained
from swapformer.checkpoint.recipe import (
    CORES_FILE,
    FORMAT,
    FORMAT_VERSION,
    HOST_FILE,
    RECIPE_FILE,
    RecipeMismatchError,
    read_recipe,
)
from swapformer.checkpoint.save import save
from swapformer.checkpoint.weights import read_tensors

__all__ = [
    "CORES_FILE",
    "FORMAT",
    "FORMAT_VERSION",
    "HOST_FILE",
    "RECIPE_FILE",
    "RecipeMismatchError",
    "build_inputs",
    "describe_inputs",
    "from_pretrained",
    "load",
    "read_recipe",
    "read_tensors",
    "save",
    "save_pretrained",
]
