"""One settings object, one check: ``SparseVidConfig.validate`` composes the planner's, the tail's, the
backends' and the ring's checks, and every front end (``sv.apply``, ComfyUI, eval, the bench commands)
refuses a bad setting with it before any model is built, timed or generated (issue 32: F2, F4-F8)."""

import inspect
import shlex
import types

import pytest
import torch

import sparsevid as sv
from sparsevid.lab import cli
from sparsevid.config import NAMED_SETTINGS, SparseVidConfig
from sparsevid.planners import planner_spec, planners_taking


def run_cli(line: str, capsys) -> tuple[int, str]:
    try:
        code = cli.main(shlex.split(line))
    except SystemExit as exit:
        code = exit.code
    return code, capsys.readouterr().err


# ---------------------------------------------------------------------------------------- planner defaults
@pytest.mark.parametrize("method", sv.available_planners())
def test_a_planners_declared_default_is_what_it_spends(method):
    """The default budget stated at registration is the one the planner applies given neither density nor mass."""
    kind, value = planner_spec(method).default
    layout = sv.VideoLayout(2, 8, 8, tile=(4, 4), block_size=16)
    q, k = torch.randn(2, 1, 2, layout.num_tokens, 16, generator=torch.Generator().manual_seed(0))
    default = sv.plan(q, k, layout, method)
    stated = sv.plan(q, k, layout, method, **{kind: value})
    assert type(default) is type(stated)
    assert torch.equal(default.to_mask(), stated.to_mask())


def test_tables_derive_from_the_registry():
    from sparsevid.lab import demo
    from sparsevid.lab.bench import frontier
    from sparsevid.integrations.core import budget

    assert list(demo.TABLE_METHODS) == frontier.METHODS == planners_taking("density")
    assert "dense" not in planners_taking("density") and {"draft", "xattn"} <= set(planners_taking("mass"))
    assert budget(SparseVidConfig("xattn")) == ("mass", 0.9, True)
    assert budget(SparseVidConfig("window")) == ("density", 0.1, True)


def test_register_planner_refuses_an_unknown_budget():
    from sparsevid.planners import register_planner

    with pytest.raises(ValueError, match="budgets"):
        register_planner("never-registered", budgets=("radius",))
    with pytest.raises(ValueError, match="default"):
        register_planner("never-registered", default=("tokens", 3))


def test_presets_are_what_the_docs_say():
    from sparsevid.integrations.core import budget

    assert NAMED_SETTINGS == {"fast": dict(method="draft", density=0.1), "balanced": dict(method="draft", density=0.25)}
    assert SparseVidConfig.named("balanced") == SparseVidConfig(density=0.25)
    # "fast" is what apply runs with no options: draft's declared default density
    assert budget(SparseVidConfig()) == ("density", NAMED_SETTINGS["fast"]["density"], True)
    assert SparseVidConfig.named(None, dense_layers=2) == SparseVidConfig(dense_layers=2)


def test_a_preset_keeps_the_other_settings_and_their_defaults():
    config = SparseVidConfig.named("balanced", method="draft", density=None, dense_layers=2, tail=None)
    assert (config.method, config.density, config.dense_layers, config.tail) == ("draft", 0.25, 2, None)


@pytest.mark.parametrize("name, settings, match", [
    ("balanced", dict(density=0.3), "Expect either preset='balanced' or density=0.3, not both: the preset sets density"),
    ("fast", dict(density=0.1), "preset='fast' or density=0.1"),  # explicit, even at the preset's own value
    ("fast", dict(method="xattn"), "the preset sets method"),
    ("fast", dict(method=None), "the preset sets method"),
    ("quality", {}, r"Expect preset in \['balanced', 'fast'\]"),
    (["fast"], {}, "Expect preset in"),
])
def test_presets_refuse_a_conflict_and_an_unknown_name(name, settings, match):
    with pytest.raises(ValueError, match=match):
        SparseVidConfig.named(name, **settings)


# ---------------------------------------------------------------------------------------- validate
@pytest.mark.parametrize("settings, where, match", [
    (dict(method="bogus"), {}, "method"),
    (dict(density=1.5), {}, "density"),
    (dict(dense_layers=-1), {}, "dense_layers"),
    (dict(dense_layers=4), dict(layers=4), "dense_layers < 4"),
    (dict(tail="bogus"), {}, "tail"),
    (dict(method="finegrained", tail="pooled-var"), {}, "BlockPlan"),
    (dict(backend="flex", tail="pooled-var"), {}, "no tail pass"),
    (dict(method="random", head_balance=True), {}, "head_balance"),
    (dict(method=None, tail="pooled-var"), {}, "method"),
    (dict(planner_options=dict(bogus=1)), {}, "bogus"),
    # F2: what the ring does not run, asked of the ring's own declaration
    (dict(method="finegrained"), dict(ring=True), "block plans under ring"),
    (dict(backend="flex"), dict(ring=True), "ring step"),
    (dict(), dict(ring=True, text_tokens=True), "text tokens"),
    (dict(method="dense", quant="int8"), dict(ring=True), "quant=None under ring"),
])
def test_validate_refuses_each_bad_setting(settings, where, match):
    with pytest.raises((ValueError, TypeError), match=match):
        SparseVidConfig(**settings).validate(**where)


def test_validate_accepts_the_defaults_and_a_ring():
    config = SparseVidConfig()
    assert config.validate(layers=2, ring=True) is config
    SparseVidConfig(method=None).validate(layers=1)  # native attention: no layer need run sparse


def test_replanning_defaults_to_the_planners_declaration():
    """replan_every=None: each planner's declared interval (clustered 4: measured free in quality; the others 1);
    an explicit value wins; native attention replans nothing."""
    assert SparseVidConfig(method="clustered").replan_interval == 4
    assert SparseVidConfig(method="draft").replan_interval == 1
    assert SparseVidConfig(method="clustered", replan_every=1).replan_interval == 1
    assert SparseVidConfig(method=None).replan_interval == 1
    SparseVidConfig(method="clustered").validate(layers=2)
    with pytest.raises(ValueError, match="replan_every"):
        SparseVidConfig(replan_every=0).validate(layers=2)


def test_comfyui_states_the_defaults_of_the_config():
    """The ComfyUI adapter restated dense_steps with its own default (0.2 instead of None)."""
    from sparsevid.integrations import comfyui

    defaults = SparseVidConfig()
    for name, parameter in inspect.signature(comfyui.apply).parameters.items():
        if hasattr(defaults, name) and parameter.default is not inspect.Parameter.empty:
            assert parameter.default == getattr(defaults, name), name


def test_apply_after_a_ring_refuses_what_the_ring_does_not_run():
    """F2: sv.apply after enable_parallelism(ring) accepted token plans and failed at the first sparse step."""
    pytest.importorskip("diffusers")
    from tiny_models import tiny_wan

    model = tiny_wan()
    context = types.SimpleNamespace(ring_degree=2, ulysses_degree=1)
    model._parallel_config = types.SimpleNamespace(context_parallel_config=context)  # what enable_parallelism records
    with pytest.raises(ValueError, match="block plans under ring"):
        sv.apply(model, method="finegrained", dense_layers=0)
    with pytest.raises(ValueError, match="ring step"):
        sv.apply(model, backend="flex", dense_layers=0)
    sv.apply(model, dense_layers=0).remove()


# ---------------------------------------------------------------------------------------- stats
def test_stats_count_calls_and_name_the_tail_and_backend():
    """F7: a key-padding mask counted one call per batch element; stats() did not say which tail/backend ran."""
    pytest.importorskip("diffusers")
    from tiny_models import hunyuan_inputs, tiny_hunyuan

    model = tiny_hunyuan()
    counted = []
    for padded in (0, 3):
        handle = sv.apply(model, method="draft", density=0.3, dense_steps=0, dense_layers=0, tail="pooled-var",
                          tile=(2, 4), block_size=16)
        with torch.no_grad():
            model(**hunyuan_inputs(batch=2, padded=padded))
        stats = handle.stats()
        handle.remove()
        counted.append(stats["sparse_calls"])
        assert stats["tail"] == "pooled-var" and stats["backends"] == ["reference"]
        assert handle.stats() == stats  # the last counts stay readable after remove()
    assert counted[0] == counted[1] > 0


def test_handles_remove_once_and_keep_their_last_stats():
    pytest.importorskip("diffusers")
    from tiny_models import tiny_wan, wan_inputs

    from sparsevid.integrations.diffusers import _state_hook

    model = tiny_wan()
    with sv.apply(model, method="draft", density=0.5, dense_steps=0, dense_layers=0, tile=(1, 4),
                  block_size=16) as handle:
        with torch.no_grad():
            model(**wan_inputs(batch=1, frames=4, height=6, width=8))
    stats = handle.stats()
    assert stats["sparse_calls"] > 0 and _state_hook(model) is None  # removed on leaving the with block
    handle.remove()  # a second remove does nothing
    assert handle.stats() == stats


# ---------------------------------------------------------------------------------------- the command line
NO_WORK = [  # F4/F5/F10: each was refused only after native timings, a dense generation, or not at all
    "bench e2e --model tiny-wan --methods random --head-balance on",
    "bench e2e --model tiny-wan --dense-layers 2",
    "bench e2e --model tiny-wan --ring-degree 0",
    "bench e2e --model tiny-wan --gpus 2 --ring-degree 2 --dense-layers 0 --methods finegrained",
    "bench e2e --model tiny-wan --gpus 2 --ring-degree 2 --dense-layers 0 --backends flex",
    "bench e2e --model tiny-wan --gpus 2 --ring-degree 2",
    "eval --methods draft --densities 0.1 --dense-layers 4",
    "eval --methods finegrained --tail pooled-var",
    "eval --frames 0",
    "bench kernel --methods bogus",
]


@pytest.mark.parametrize("line", NO_WORK)
def test_bad_settings_fail_before_any_work(line, capsys, tmp_path, monkeypatch):
    from sparsevid.lab import eval as sv_eval
    from sparsevid.lab.bench import e2e

    def work(*args, **kwargs):
        raise AssertionError("work started")

    monkeypatch.setattr(e2e, "_build", work)
    monkeypatch.setattr(sv_eval.TestbedTarget, "load", work)
    code, err = run_cli(f"{line} --out {tmp_path / 'out'}", capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and ": error: " in lines[0] and lines[0].startswith("sparsevid"), err


def test_usage_errors_are_one_line(capsys):
    """F8: argparse printed the full usage (17-18 lines) before the error."""
    for line in ("eval --tail bogus", "bench e2e --reps 0", "bench kernel --bogus", "demo --densities 2"):
        code, err = run_cli(line, capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "error: " in err, err


def test_tail_values_accumulate_once_each():
    """F6: `--tail a a` ran the config twice; `--tail a --tail b` kept only b."""
    from sparsevid.lab.eval import make_configs

    parser = cli.build_parser()
    assert parser.parse_args(["eval", "--tail", "pooled-var", "pooled-var"]).tail == ["pooled-var"]
    assert parser.parse_args(["eval", "--tail", "pooled-var", "--tail", "none", "pooled-var-32"]).tail == [
        "pooled-var", None, "pooled-var-32"]
    assert parser.parse_args(["eval"]).tail == [None]
    names = [c.name for c in make_configs(["draft"], [0.1, 0.1], tails=["pooled-var", "pooled-var"])]
    assert names == ["draft@0.1 tail=pooled-var"]


# ---------------------------------------------------------------------------------------- documented behaviour
def test_nan_in_v_reaches_the_rows_the_docstring_says():
    """F9: with a tail, NaN in one token's v reaches every row (its block's summary), not only the rows whose
    plan computes it; the docstring now says so."""
    layout = sv.VideoLayout(2, 4, 8, tile=(2, 8), block_size=16)
    q, k, v = torch.randn(3, 1, 1, layout.num_tokens, 16, generator=torch.Generator().manual_seed(0))
    v[0, 0, 0] = float("nan")
    plan = sv.BlockPlan.from_block_mask(layout, torch.eye(4, dtype=torch.bool).view(1, 1, 4, 4))
    computes = plan.to_mask()[0, 0, :, 0]
    exact = sv.sparse_attention(q, k, v, plan).isnan().any(-1)[0, 0]
    assert torch.equal(exact, computes) and 0 < int(computes.sum()) < layout.num_tokens
    assert bool(sv.sparse_attention(q, k, v, plan, tail="pooled-var").isnan().any(-1).all())
    assert "with a\n        tail, every row" in sv.sparse_attention.__doc__
