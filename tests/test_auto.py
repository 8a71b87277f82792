"""Per-site plans and ``target="auto"``: mixed plans in the rewriter and the recipe, the budget, the
knapsack against brute force, and a tiny Llama whose right plan is known by construction.

The constructed model (:func:`_local_and_far_llama`) has two attention layers:

* layer 0 is purely local: its queries and keys are the same constant vector (zero weights, a bias)
  in the four fastest RoPE pairs, so the score ``sum_p a^2 cos(theta_p * (i - j))`` peaks at the
  query's own position by a wide margin and attention puts ~all its mass on the token itself:
  ``window`` loses nothing there;
* layer 1 needs the far past: large random q/k weights attend by content over the whole context,
  so a small window loses most of the attention mass.

Under a budget that allows replacing one layer, ``auto`` must replace layer 0 with ``window`` and
keep layer 1.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import swapformer
from swapformer import Budget, ConfigError, InputError, Plan
from swapformer.planner import AutoOptions, choose, measure
from swapformer.rewriter.plan import target_label
from swapformer.targets.base import resolve_target

transformers = pytest.importorskip("transformers")

HEAD_DIM, HEADS, KV_HEADS, SEQ = 16, 4, 2, 96
LOCAL, FAR = "model.layers.0.self_attn", "model.layers.1.self_attn"
WINDOW = resolve_target("window", window=8)
CONTEXT = 4096
KV_BYTES = CONTEXT * KV_HEADS * 2 * HEAD_DIM * 4  # one layer's fp32 key/value cache at CONTEXT
ONE_LAYER_STATE = Budget.state(1.2 * KV_BYTES, context=CONTEXT)  # one layer may keep its cache


def _local_and_far_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=HEADS * HEAD_DIM, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, vocab_size=100,
                                      attention_bias=True, pad_token_id=0, eos_token_id=None)
    model = transformers.LlamaForCausalLM(config).eval()
    local, far = model.model.layers[0].self_attn, model.model.layers[1].self_attn
    const = torch.zeros(HEAD_DIM)
    const[:4] = 16.0  # the first dim of each of the four fastest rotary pairs
    with torch.no_grad():
        local.q_proj.weight.zero_()
        local.k_proj.weight.zero_()
        local.q_proj.bias.copy_(const.repeat(HEADS))
        local.k_proj.bias.copy_(const.repeat(KV_HEADS))
        far.q_proj.weight.normal_(0, 0.25)
        far.k_proj.weight.normal_(0, 0.25)
    return model


def _self_score_margin() -> float:
    """The smallest gap between a query's score on itself and on any earlier key of layer 0."""
    theta = 10000.0 ** (-torch.arange(0, HEAD_DIM, 2, dtype=torch.float64)[:4] / HEAD_DIM)
    delta = torch.arange(1, SEQ, dtype=torch.float64)
    scores = (16.0**2 * torch.cos(theta[None] * delta[:, None])).sum(1) / math.sqrt(HEAD_DIM)
    return float(16.0**2 * 4 / math.sqrt(HEAD_DIM) - scores.max())


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return _local_and_far_llama()


@pytest.fixture(scope="module")
def analysis(model):
    return swapformer.prepare(model)


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(3, 100, (2, SEQ), generator=torch.Generator().manual_seed(1))


def _decisions(report) -> dict[str, str]:
    out = {r.site.module: r.target for r in report.replaced}
    out.update({s.site.module: "keep" for s in report.skipped})
    return out


# --- the plan known by construction -----------------------------------------------------------------


def test_layer_0_is_local_by_construction() -> None:
    assert _self_score_margin() > 30  # e^-30 of the mass outside the query itself


@pytest.mark.parametrize("budget", [ONE_LAYER_STATE, Budget.decode(1.5, context=CONTEXT)],
                         ids=["state", "decode"])
def test_auto_replaces_the_local_layer_and_keeps_the_far_one(analysis, ids, budget) -> None:
    report = analysis.explain("auto", budget=budget, calibration_data=ids,
                              candidates=[WINDOW, "fastweight", "elita", "cat"])
    assert report.dry_run and report.target == "auto"
    assert _decisions(report) == {LOCAL: "window", FAR: "keep"}, report
    [replaced] = report.replaced
    assert replaced.config == WINDOW
    text = str(report)
    assert "quality cost" in text and "kept by the plan" in text and budget.describe() in text


def test_rewrite_auto_builds_the_plan_and_new_parameters_live_in_replaced_sites(model, ids) -> None:
    student = swapformer.rewrite(model, "auto", budget="state@4096=1.2MiB", calibration_data=[ids],
                                 candidates=[WINDOW, "fastweight"])
    report = student.swapformer_report
    assert _decisions(report) == {LOCAL: "window", FAR: "keep"}
    assert report.plan is not None and report.plan.label == "auto"
    # calibration trains report.replaced; nothing new exists outside the replaced sites
    base = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    new = [n for n, _ in [*student.named_parameters(), *student.named_buffers()] if n not in base]
    assert all(n.startswith(LOCAL + ".") for n in new)
    assert not hasattr(student.get_submodule(FAR), "swapformer_core")


def test_measured_costs_come_from_the_cores_accounting(analysis, ids) -> None:
    options = AutoOptions.from_options({"budget": ONE_LAYER_STATE, "calibration_data": ids,
                                        "candidates": [WINDOW, "fastweight"], "transfer_steps": 2,
                                        "quality": "error"})
    measured = measure(analysis, options)
    for site in measured.sites:
        (keep, *_, window, fastweight) = measured.options[site.name]
        assert keep[0] == "keep" and keep[2:] == (0.0, KV_BYTES)
        assert window[0] == "window(window=8)" and window[3] == (8 - 1 + 4) * (KV_HEADS * 2 * HEAD_DIM * 4 + 9)
        assert fastweight[0] == "fastweight" and 0 < fastweight[3] < KV_BYTES
    errors = {site.name: [o[2] for o in measured.options[site.name]] for site in measured.sites}
    assert errors[f"{LOCAL}:0"][1] < 1e-6 < 0.1 < errors[f"{FAR}:0"][1]  # window: exact locally, lossy far away
    assert measured.fixed == 0  # a state budget: nothing but attention holds state


def test_calibration_trains_only_what_the_plan_replaced(analysis, model, ids) -> None:
    from swapformer.calibrate import CalibrationConfig, Stage, calibrate

    student = analysis.rewrite(Plan.of({FAR: "fastweight"}))
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    stages = (Stage("transfer", steps=2, train="new"), Stage("distill", steps=2, train="new"))
    # sequences longer than the hybrid's exact window of 64, so that its far memory matters
    config = CalibrationConfig(stages=stages, batch_size=2, seq_len=SEQ, eval_fraction=0.0, eval_batches=0,
                               lora_rank=0)
    calibrate(student, model, ids.repeat(4, 1), config)
    changed = {n for n, p in student.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith(f"{FAR}.swapformer_core.") for n in changed)


def test_auto_with_an_unreachable_budget_says_what_is_reachable(analysis, ids) -> None:
    with pytest.raises(ConfigError, match="no plan meets the budget decode@4096 >= 1000x.*gives"):
        analysis.explain("auto", budget=Budget.decode(1000, context=CONTEXT), calibration_data=ids,
                         candidates=[WINDOW])


def test_auto_options_are_checked_before_capture(model, ids) -> None:
    with pytest.raises(ConfigError, match="needs budget"):
        swapformer.rewrite(model, "auto", calibration_data=ids)
    with pytest.raises(ConfigError, match="needs calibration_data"):
        swapformer.rewrite(model, "auto", budget="decode@4096=2")
    with pytest.raises(ConfigError, match="no option"):
        swapformer.rewrite(model, "auto", budget="decode@4096=2", calibration_data=ids, windows=(4,))
    with pytest.raises(ConfigError, match="KIND@CONTEXT=VALUE"):
        swapformer.explain(model, "auto", budget="fast", calibration_data=ids)
    with pytest.raises(InputError, match="input ids"):
        swapformer.explain(model, "auto", budget="decode@4096=2", calibration_data=[torch.randn(2, 8)])


# --- hand-written plans -------------------------------------------------------------------------------


def test_mixed_plan_gives_each_site_its_own_config(analysis) -> None:
    plan = Plan.of({LOCAL: WINDOW, f"{FAR}:0": "fastweight"})
    student = analysis.rewrite(plan)
    report = student.swapformer_report
    assert {r.site.module: r.config for r in report.replaced} == {LOCAL: WINDOW, FAR: resolve_target("fastweight")}
    assert type(student.get_submodule(f"{LOCAL}.swapformer_core")).__name__ == "WindowAttention"
    assert student.get_submodule(f"{LOCAL}.swapformer_core").window == 8


def test_sites_a_plan_does_not_name_are_kept(analysis) -> None:
    report = analysis.explain(Plan.of({LOCAL: "window"}))
    assert _decisions(report) == {LOCAL: "window", FAR: "keep"}
    assert [s.reason for s in report.skipped] == ["kept by the plan"]


def test_unknown_plan_names_are_an_input_error(analysis) -> None:
    with pytest.raises(InputError, match=r"does not have: \['model.layers.7.self_attn'\]"):
        analysis.explain({LOCAL: "window", "model.layers.7.self_attn": "window"})


def test_plans_are_checked() -> None:
    with pytest.raises(InputError, match="more than once"):
        Plan(Plan.of({LOCAL: "window"}).choices * 2)
    with pytest.raises(ConfigError, match="options"):
        swapformer.rewrite(torch.nn.Linear(2, 2), Plan.of({LOCAL: "window"}), window=4)


def test_mixed_plan_round_trips_through_save_and_load(analysis, model, ids, tmp_path: Path) -> None:
    plan = Plan.of({LOCAL: WINDOW, FAR: "fastweight"}, summary="by hand")
    student = analysis.rewrite(plan)
    with torch.no_grad():
        student.get_submodule(f"{FAR}.swapformer_core").mix_logit.add_(0.5)  # a trained value
    swapformer.save(student, tmp_path)
    recipe = json.loads((tmp_path / "swapformer.json").read_text())
    assert recipe["format_version"] == 2 and recipe["rewrite"]["target"] == {"target": "plan"}
    assert [s["target"]["target"] for s in recipe["sites"]] == ["window", "fastweight"]
    loaded = swapformer.load(tmp_path, model)
    assert loaded.swapformer_report.plan == plan
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, student(ids).logits)


def test_single_target_recipe_without_site_targets_still_loads(analysis, model, ids, tmp_path: Path) -> None:
    student = analysis.rewrite("window", window=8)
    swapformer.save(student, tmp_path)
    file = tmp_path / "swapformer.json"
    recipe = json.loads(file.read_text())
    assert recipe["format_version"] == 1
    for site in recipe["sites"]:  # as written before per-site targets were recorded
        site.pop("target")
    file.write_text(json.dumps(recipe))
    loaded = swapformer.load(tmp_path, model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, student(ids).logits)


def test_plan_recipe_refuses_a_target_argument(analysis, tmp_path: Path) -> None:
    student = analysis.rewrite(Plan.of({LOCAL: "window"}))
    with pytest.raises(InputError, match="pass no target"):
        swapformer.save(student, tmp_path, target="window")


# --- the budget ----------------------------------------------------------------------------------------


def test_budget_spellings() -> None:
    assert Budget.parse("decode@32768=3") == Budget.decode(3, context=32768)
    assert Budget.parse("prefill@4096=2.5") == Budget("prefill", 2.5, 4096)
    assert Budget.parse("state@1024=2MiB") == Budget.state(2 * 2**20, context=1024)
    assert Budget.parse(" state @ 8 = 1.5kb ").value == 1500


@pytest.mark.parametrize("make, match", [
    (lambda: Budget("speed", 2.0, 10), "kind must be one of"),
    (lambda: Budget.decode(0.5), "must be >= 1"),
    (lambda: Budget.state(0), "positive number of bytes"),
    (lambda: Budget.decode(2, context=0), "positive int"),
    (lambda: Budget.decode(2, context=True), "positive int"),
    (lambda: Budget.decode(float("inf")), "finite"),
    (lambda: Budget.parse("decode=3"), "KIND@CONTEXT=VALUE"),
    (lambda: Budget.parse("decode@1024=3MiB"), "units are for state"),
    (lambda: Budget.parse("state@1024=3parsecs"), "is not one of"),
])
def test_budget_validation(make, match) -> None:
    with pytest.raises(ConfigError, match=match):
        make()


def test_budget_capacity() -> None:
    decode = Budget.decode(2)
    assert decode.capacity(fixed=10, original=30) == 10  # (10 + 30) / 2 - 10
    assert decode.achieved(fixed=10, planned=10, original=30) == 2
    assert Budget.state(100).capacity(fixed=40, original=500) == 60


# --- the knapsack -------------------------------------------------------------------------------------


def _brute_force(quality, cost, capacity):
    best = None
    for picks in itertools.product(*(range(len(g)) for g in quality)):
        if sum(cost[i][j] for i, j in enumerate(picks)) <= capacity + 1e-9:
            total = sum(quality[i][j] for i, j in enumerate(picks))
            best = total if best is None else min(best, total)
    return best


def _instances(cost_values):
    group = st.integers(1, 4).flatmap(lambda n: st.tuples(
        st.lists(st.floats(0, 10, allow_nan=False), min_size=n, max_size=n),
        st.lists(cost_values, min_size=n, max_size=n)))
    return st.lists(group, min_size=1, max_size=5)


@given(_instances(st.integers(0, 20)), st.integers(0, 60))
def test_knapsack_matches_brute_force_on_integer_costs(groups, capacity) -> None:
    quality, cost = [list(q) for q, _ in groups], [list(c) for _, c in groups]
    picks = choose(quality, cost, capacity)
    best = _brute_force(quality, cost, capacity)
    if best is None:
        assert picks is None
        return
    assert sum(cost[i][j] for i, j in enumerate(picks)) <= capacity
    assert sum(quality[i][j] for i, j in enumerate(picks)) == pytest.approx(best, abs=1e-9)


@given(_instances(st.floats(0, 1e6, allow_nan=False)), st.floats(0, 3e6, allow_nan=False), st.integers(1, 64))
def test_knapsack_on_real_costs_meets_the_budget_and_loses_at_most_one_unit_per_site(groups, capacity,
                                                                                     resolution) -> None:
    quality, cost = [list(q) for q, _ in groups], [list(c) for _, c in groups]
    picks = choose(quality, cost, capacity, resolution=resolution)
    best = _brute_force(quality, cost, capacity)
    if best is None:
        assert picks is None
        return
    assert sum(cost[i][j] for i, j in enumerate(picks)) <= capacity * (1 + 1e-9) + 1e-9
    got = sum(quality[i][j] for i, j in enumerate(picks))
    assert got >= best - 1e-9
    # any plan that fits the capacity less one rounding unit per site is within the discretised budget
    room = capacity - sum(min(c) for c in cost)
    tighter = _brute_force(quality, cost, capacity - len(cost) * room / resolution)
    if tighter is not None:
        assert got <= tighter + 1e-9


def test_knapsack_with_a_subnormal_room_keeps_the_options_that_fit() -> None:
    # hypothesis found it: room / resolution underflowed and 1.5 / unit overflowed the int conversion
    assert choose([[0.0, 0.0]], [[0.0, 1.5]], 2.225073858507e-311, resolution=1) == [0]
    assert choose([[1.0, 0.0]], [[0.0, 1e-311]], 1e-311, resolution=1) == [1]
    assert choose([[0.0, 0.0]], [[0.0, 1.5]], 5e-324, resolution=2) == [0]  # room / 2 underflows to 0
    assert choose([[1.0, 0.0]], [[0.0, 5e-324]], 5e-324, resolution=2) == [1]


def test_knapsack_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="same groups"):
        choose([[0.0]], [[1.0, 2.0]], 3)
    with pytest.raises(ValueError, match="finite"):
        choose([[math.nan]], [[1.0]], 3)


# --- the command line ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_dir(model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("tokenizers")
    from tests.test_cli import TEXT, _char_tokenizer

    path = tmp_path_factory.mktemp("local-far-llama")
    tokenizer = _char_tokenizer()
    assert len(tokenizer) <= model.config.vocab_size
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "corpus.txt").write_text(TEXT)
    return path


def test_cli_convert_auto_saves_and_loads_the_plan(hf_dir: Path, model, tmp_path: Path, capsys) -> None:
    from tests.test_cli import run

    out_dir = tmp_path / "auto"
    code, out, err = run(["convert", str(hf_dir), "--target", "auto", "--budget", "state@4096=1.2MiB",
                          "--corpus", str(hf_dir / "corpus.txt"), "--seq-len", "96", "--batch-size", "2",
                          "--plan-batches", "1", "-o", 'candidates=["window", "elita"]', "--out", str(out_dir)],
                         capsys)
    assert code == 0, err
    assert "plan: state@4096 <= 1.258e+06 bytes" in out
    recipe = json.loads((out_dir / "swapformer.json").read_text())
    assert recipe["rewrite"]["plan"]["label"] == "auto"
    loaded = swapformer.load(out_dir, model)
    assert loaded.swapformer_report.plan.label == "auto"
    assert [r.config.name for r in loaded.swapformer_report.replaced] == [
        s["target"]["target"] for s in recipe["sites"] if s["decision"] == "replaced"]


def test_cli_explain_auto_and_budget_errors(hf_dir: Path, tmp_path: Path, capsys) -> None:
    from tests.test_cli import run

    code, out, err = run(["explain", str(hf_dir), "--target", "auto", "--budget", "decode@4096=1.5",
                          "--corpus", str(hf_dir / "corpus.txt"), "--seq-len", "96", "--batch-size", "2",
                          "--plan-batches", "1", "-o", 'candidates=["window"]'], capsys)
    assert code == 0, err
    assert "target 'auto'" in out and "quality cost" in out
    code, _, err = run(["convert", str(hf_dir), "--target", "auto", "--out", str(tmp_path)], capsys)
    assert code == 1 and "--target auto needs --budget" in err
    code, _, err = run(["convert", str(hf_dir), "--target", "window", "--budget", "decode@4096=2",
                        "--out", str(tmp_path)], capsys)
    assert code == 1 and "--budget chooses a plan for --target auto" in err
    code, _, err = run(["explain", str(hf_dir), "--target", "auto", "--budget", "decode=2"], capsys)
    assert code == 2 and "KIND@CONTEXT=VALUE" in err


def test_transfer_steps_train_the_candidates_new_parameters(analysis, model, ids) -> None:
    from swapformer.planner.quality import site_errors

    before = site_errors(analysis.rewrite("fastweight", verify=False), model, [ids])
    student = analysis.rewrite("fastweight", verify=False)
    core = student.get_submodule(f"{FAR}.swapformer_core")
    start = [p.detach().clone() for p in core.new_parameters()]
    after = site_errors(student, model, [ids], transfer_steps=5, lr=1e-3)
    assert any(not torch.equal(a, p) for a, p in zip(start, core.new_parameters()))
    assert after[f"{FAR}:0"] < before[f"{FAR}:0"]


# --- the second quality measure, one measurement for many budgets, the cost of a rewritten model ------


def test_perplexity_measure_sees_the_far_layer_and_plans_the_same(analysis, model, ids) -> None:
    from swapformer.planner.quality import mean_nll

    options = AutoOptions.from_options({"budget": ONE_LAYER_STATE, "calibration_data": ids,
                                        "candidates": [WINDOW], "quality": "perplexity"})
    measured = measure(analysis, options)
    delta = {s.name: measured.options[s.name][1][2] for s in measured.sites}
    # replacing the local layer alone changes the loss by ~nothing; the far layer's window loses the past
    assert 0 <= delta[f"{LOCAL}:0"] < 1e-4 < 0.01 < delta[f"{FAR}:0"]
    only_far = analysis.rewrite(Plan.of({FAR: WINDOW}))
    assert delta[f"{FAR}:0"] == pytest.approx(mean_nll(only_far, [ids]) - mean_nll(model, [ids]), rel=1e-4)
    report = analysis.explain("auto", budget=ONE_LAYER_STATE, calibration_data=ids, candidates=[WINDOW],
                              quality="perplexity")
    assert _decisions(report) == {LOCAL: "window", FAR: "keep"}


def test_unknown_quality_measure_is_a_config_error(ids) -> None:
    with pytest.raises(ConfigError, match="quality must be one of error, perplexity"):
        AutoOptions.from_options({"budget": ONE_LAYER_STATE, "calibration_data": ids, "quality": "vibes"})


def test_select_plan_reuses_one_measurement_for_several_budgets(analysis, ids) -> None:
    from swapformer.planner import select_plan

    budget = Budget.decode(1.5, context=CONTEXT)
    measured = measure(analysis, AutoOptions.from_options({"budget": budget, "calibration_data": ids,
                                                           "candidates": [WINDOW]}))
    assert select_plan(measured, budget) == analysis.explain("auto", budget=budget, calibration_data=ids,
                                                             candidates=[WINDOW]).plan
    loose = select_plan(measured, Budget.decode(1.01, context=CONTEXT))
    assert [c.label for c in loose.choices] == ["window(window=8)", "keep"]
    with pytest.raises(ConfigError, match="no plan meets"):
        select_plan(measured, Budget.decode(1000, context=CONTEXT))


def test_model_cost_of_a_plan_is_what_the_planner_promised(analysis, model, ids) -> None:
    from swapformer.planner import fixed_cost, flop_cost, model_cost

    budget = Budget.decode(1.5, context=CONTEXT)
    report = analysis.explain("auto", budget=budget, calibration_data=ids, candidates=[WINDOW])
    student = analysis.rewrite(report.plan)
    cost, original = model_cost(student, model, "decode", CONTEXT)
    sites = {s.module: s for s in report.sites}
    dense = flop_cost(sites[LOCAL], None, "decode", CONTEXT)
    windowed = flop_cost(sites[LOCAL], student.get_submodule(f"{LOCAL}.swapformer_core"), "decode", CONTEXT)
    assert original == fixed_cost(model, "decode") + 2 * dense
    assert cost == original - dense + windowed
    assert original / cost >= 1.5 and f"plan {original / cost:.3g}x" in report.plan.summary
    with pytest.raises(InputError, match="made by swapformer"):
        model_cost(model, model, "decode", CONTEXT)


# --- measured per-layer times as the cost model --------------------------------------------------------


def test_measured_cost_times_cores_on_the_sites_shapes_and_plans_within_its_own_budget(analysis, model, ids) -> None:
    from swapformer.planner import MeasuredCost, flop_cost, model_cost, recost, select_plan

    timer = MeasuredCost(threads=1, repeats=3)
    long = 65536
    student = analysis.rewrite(WINDOW, verify=False)
    site = student.swapformer_report.replaced[0].site
    core = student.get_submodule(student.swapformer_report.replaced[0].core_name)
    dense, windowed = timer(site, None, "decode", long), timer(site, core, "decode", long)
    assert 0 < windowed < dense  # 11 cached rows against 65,536
    assert timer(site, core, "state", long) == flop_cost(site, core, "state", long)
    assert timer.fixed_cost(model, "decode") > 0 and timer.fixed_cost(model, "state") == 0
    with pytest.raises(ConfigError, match="prefills up to"):
        timer(site, None, "prefill", long)
    hybrid = analysis.rewrite("elita", verify=False)  # stateful, reads the block input
    rep = hybrid.swapformer_report.replaced[0]
    assert 0 < timer(rep.site, hybrid.get_submodule(rep.core_name), "decode", long) < dense
    # one measurement of quality, costed by both models; the measured plan meets its measured budget
    budget = Budget.decode(1.5, context=long)
    measured = measure(analysis, AutoOptions.from_options({"budget": budget, "calibration_data": ids,
                                                           "candidates": [WINDOW]}))
    timed = recost(analysis, measured, budget, timer)
    assert [o[2] for o in timed.options[f"{LOCAL}:0"]] == [o[2] for o in measured.options[f"{LOCAL}:0"]]
    assert timed.options[f"{LOCAL}:0"][0][3] == dense
    plan = select_plan(timed, budget)
    cost, original = model_cost(analysis.rewrite(plan), model, "decode", long, cost_fn=timer)
    assert original / cost >= 1.5


def test_model_timed_cost_splits_the_whole_models_decode_step_per_layer(analysis, model, ids) -> None:
    from swapformer.planner import ModelTimedCost, model_cost, recost, select_plan

    timer, long = ModelTimedCost(steps=3, state_probe=256), 65536
    with pytest.raises(ConfigError, match="bind"):
        timer(analysis.sites[0], None, "decode", long)
    with pytest.raises(InputError, match="causal LM"):
        timer.bind(SimpleNamespace(model=torch.nn.Linear(4, 4), sites=[]))
    timer.bind(analysis)
    student = analysis.rewrite(WINDOW, verify=False)
    rep = student.swapformer_report.replaced[0]
    core = student.get_submodule(rep.core_name)
    keep, windowed = timer(rep.site, None, "decode", long), timer(rep.site, core, "decode", long)
    assert 0 < windowed < keep  # 11 cached rows against 65,536 in every layer
    with pytest.raises(ConfigError, match="decode steps"):
        timer(rep.site, core, "prefill", long)
    # a uniform plan costs exactly the model time measured for it; the original, its own
    (original_s, _), (window_s, replaced) = (timer._seconds[(None, long)],
                                             timer._seconds[(target_label(WINDOW), long)])
    assert replaced == 2
    assert model_cost(student, model, "decode", long, cost_fn=timer) == pytest.approx((window_s, original_s))
    # a plan that replaces one site is costed from the same uniform timing: that site's share
    one = analysis.rewrite(WINDOW, filter_fn=lambda s: s.name == f"{FAR}:0", verify=False)
    cost, original = model_cost(one, model, "decode", long, cost_fn=timer)
    assert (cost, original) == pytest.approx(((original_s + window_s) / 2, original_s))
    # the plan chosen under the timed costs meets its budget in the same costs
    budget = Budget.decode(1.2, context=long)
    measured = measure(analysis, AutoOptions.from_options({"budget": budget, "calibration_data": ids,
                                                           "candidates": [WINDOW]}))
    plan = select_plan(recost(analysis, measured, budget, timer), budget)
    cost, original = model_cost(analysis.rewrite(plan), model, "decode", long, cost_fn=timer)
    assert original / cost >= 1.2
    assert all("s/token at 65536" in c.reason for c in plan.choices)  # the reasons say the costs' unit


# --- the zoo's auto option ---------------------------------------------------------------------------


def test_zoo_runs_auto_under_a_budget_and_records_the_plan(tmp_path: Path) -> None:
    from swapformer import zoo
    from swapformer.zoo.runner import parse_targets

    assert "auto" not in parse_targets("all") and parse_targets("auto,window") == ["auto", "window"]
    toml = tmp_path / "zoo.toml"
    toml.write_text("""
[zoo]
seq_len = 16
repeats = 1
decode_tokens = 2
flops_contexts = [16, 4096]
plan_seq_len = 48
[targets.auto]
budget = "decode@4096=1.2"
candidates = ["fastweight", "cat"]
[[model]]
name = "llama-tiny"
hf_config = { model_type = "llama", hidden_size = 32, intermediate_size = 64, num_hidden_layers = 2, num_attention_heads = 4, num_key_value_heads = 2, vocab_size = 256, max_position_embeddings = 64 }
""")
    out = tmp_path / "out"
    assert zoo.main([str(toml), "--target", "auto", "--out", str(out), "--jobs", "1", "--quiet"]) == 0
    [record] = json.loads((out / "report.json").read_text())["records"]
    assert record["target"] == "auto" and record["status"] == "ok", record.get("reason")
    plan = record["rewrite"]["plan"]
    assert "decode@4096 >= 1.2x" in plan["summary"] and len(plan["choices"]) == 2
    assert set(plan["choices"].values()) <= {"keep", "fastweight", "cat"}
    assert record["rewrite"]["replaced"] == sum(v != "keep" for v in plan["choices"].values()) >= 1
    assert record["verify"]["passed"] and "exact" not in record["verify"]
