"""``target="auto"``: a per-site plan chosen under a user's speed or memory budget.

Layout: ``budget`` (what a user asks for), ``costs`` (what each candidate costs, from the cores' own
FLOP/state accounting; ``timing``: measured seconds instead), ``quality`` (what each candidate costs in quality, measured on calibration
data), ``select`` (the multiple-choice knapsack), ``auto`` (the candidates and the planner itself),
``plan_file`` (a plan saved on its own as JSON, :func:`save_plan` / :func:`read_plan`).
Importing this package (``import swapformer`` does) registers ``"auto"`` with the rewriter.

Usage::

    plan_report = swapformer.explain(model, "auto", budget="decode@32768=3", calibration_data=ids)
    student = swapformer.rewrite(model, "auto", budget=swapformer.Budget.decode(3, 32768),
                                 calibration_data=ids)
"""

from swapformer.planner.auto import (
    AutoOptions,
    Measured,
    auto_plan,
    default_candidates,
    measure,
    recost,
    select_plan,
)
from swapformer.planner.budget import Budget
from swapformer.planner.costs import fixed_cost, flop_cost, model_cost
from swapformer.planner.plan_file import read_plan, save_plan
from swapformer.planner.select import choose
from swapformer.planner.timing import MeasuredCost, ModelTimedCost
from swapformer.rewriter.api import Planner, register_planner

register_planner("auto", Planner(AutoOptions.from_options, auto_plan))

__all__ = ["AutoOptions", "Budget", "Measured", "MeasuredCost", "ModelTimedCost", "auto_plan", "choose", "default_candidates",
           "fixed_cost", "flop_cost", "measure", "model_cost", "read_plan", "recost", "save_plan", "select_plan"]
