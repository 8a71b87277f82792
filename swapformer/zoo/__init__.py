"""Model-zoo batch runner (``swapformer zoo``): every model of a zoo file × every target, each model in
its own process. Usage, the zoo file format and the timm venv: :mod:`swapformer.zoo.runner`.

Layout, in the order a run goes through it:

* ``spec``: the zoo file (TOML) → :class:`Zoo` of :class:`ZooEntry`; ``timm:`` globs; shards.
* ``runner``: the parent process: argument parsing, the plan, worker processes (timeouts, crashes,
  resume), then the reports.
* ``worker``: one model in its own process: ``build`` it, then for each target rewrite,
  ``invariants`` (verify), ``calibration``, save and ``metrics``.
* ``records``: the JSON record per model × target that the runner and the workers share.
* ``report`` and ``plots``: ``report.json``, ``report.md`` and the PNG plots from all records.
"""

from swapformer.zoo.runner import main, run_zoo
from swapformer.zoo.spec import Zoo, ZooEntry, read_zoo

__all__ = ["Zoo", "ZooEntry", "main", "read_zoo", "run_zoo"]
