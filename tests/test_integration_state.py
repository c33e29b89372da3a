"""The integration's state under ordinary use: threads, schedules read when a generation starts,
interrupted generations, copies and pickles of a hooked model, accelerate hooks added after apply,
torch.compile without an eager forward, counts after remove, bounded caches, and settings that would
silently do something else (density a small grid cannot honour, every layer or step dense, the
default warm-up of a bare transformer, xattn's default mass budget)."""

import copy
import pickle
import threading
import warnings

import pytest
import torch

pytest.importorskip("diffusers")

import sparsevid as sv  # noqa: E402
from tiny_models import hunyuan_inputs, tiny_hunyuan, tiny_wan, tiny_wan_pipeline, wan_inputs  # noqa: E402

TILING = dict(tile=(2, 4), block_size=16)
SPARSE = dict(method="draft", density=0.3, dense_layers=0, dense_steps=0, **TILING)
GENERATE = dict(prompt="a bunny", negative_prompt="sky", height=96, width=160, num_frames=9, num_inference_steps=4,
                max_sequence_length=16, output_type="latent")


def run(model, inputs=None):
    with torch.no_grad():
        return model(**(inputs or wan_inputs()))[0]


def parked(handle):
    """Park the next forward through ``handle``'s model inside its first sparse attention call, in a thread."""
    session = handle.sessions[0]
    real, inside, go, out = session.attend, threading.Event(), threading.Event(), {}

    def held(*args, **kwargs):
        session.attend = real
        inside.set()
        go.wait(30)
        return real(*args, **kwargs)

    session.attend = held
    thread = threading.Thread(target=lambda: out.setdefault("y", run(handle.transformers[0])))
    thread.start()
    assert inside.wait(30)

    def finish():
        go.set()
        thread.join(30)
        return out["y"]

    return finish


# ------------------------------------------------------------------------------ threads
def test_two_models_in_two_threads_each_run_their_own_attention():
    """A model in another thread was routed to the session of the one inside a sparse layer."""
    a, b, plain = tiny_wan(), tiny_wan(num_layers=3), tiny_wan()
    native = run(plain)
    hb = sv.apply(b, method="window", density=0.5, dense_layers=0, dense_steps=0, **TILING)
    b_ref = run(b)
    ha = sv.apply(a, **SPARSE)
    a_ref = run(a)
    finish = parked(ha)  # thread A is inside a sparse layer of a
    try:
        assert torch.equal(run(plain), native)  # an unhooked model stays native
        assert torch.equal(run(b), b_ref)  # a hooked one runs its own session
    finally:
        assert torch.equal(finish(), a_ref)
    ha.remove()
    hb.remove()


def test_one_model_from_two_threads_at_once_raises_and_then_works():
    model = tiny_wan()
    handle = sv.apply(model, **SPARSE)
    ref = run(model)
    finish = parked(handle)
    try:
        with pytest.raises(RuntimeError, match="one forward at a time"):
            run(model, wan_inputs(frames=2))  # another grid, while thread A is inside a forward
    finally:
        assert torch.equal(finish(), ref)  # thread A was not disturbed
    assert torch.equal(run(model), ref)  # and the model takes the next forward
    handle.remove()


# ------------------------------------------------------------------------------ the schedule of each generation
def test_a_scheduler_swapped_after_apply_is_the_one_followed():
    from diffusers import UniPCMultistepScheduler

    pipe = tiny_wan_pipeline()
    handle = sv.apply(pipe, method="draft", density=0.3, dense_layers=0, **TILING)
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)  # the diffusers Wan recipe
    pipe(**{**GENERATE, "height": 48, "width": 80, "num_inference_steps": 10})
    # default warm-up: ceil(20% of 10) = 2 dense steps x (cond, uncond) x 2 layers
    assert handle.stats()["dense_calls"] == 2 * 2 * 2
    handle.remove()


def test_an_interrupted_generation_leaves_no_plans_behind():
    """replan_every=2: a generation interrupted at step 0, then the same seed again, reused step-0 plans."""
    pipe = tiny_wan_pipeline()
    settings = dict(SPARSE, density=0.2, replan_every=2)

    def generate(seed, **kwargs):
        return pipe(**{**GENERATE, **kwargs}, generator=torch.Generator().manual_seed(seed)).frames

    handle = sv.apply(pipe, **settings)
    clean = generate(0)
    handle.remove()
    handle = sv.apply(pipe, **settings)
    session = handle.sessions[0]
    real = session.attend

    def interrupt(*args, **kwargs):
        if kwargs["layer"] == 1:
            raise KeyboardInterrupt  # the user stops the generation during step 0
        return real(*args, **kwargs)

    session.attend = interrupt
    with pytest.raises(KeyboardInterrupt):
        generate(123, prompt="red sky")
    session.attend = real
    assert torch.equal(generate(0), clean)
    handle.remove()


def test_a_bare_transformer_after_a_failed_forward_plans_afresh():
    model = tiny_wan()
    settings = dict(SPARSE, replan_every=4)
    handle = sv.apply(model, **settings)
    clean = [run(model, {**wan_inputs(), "timestep": torch.full((2,), t)}) for t in (900, 800)]
    handle.remove()
    handle = sv.apply(model, **settings)
    session = handle.sessions[0]
    session.attend = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("out of memory"))
    with pytest.raises(RuntimeError, match="out of memory"):
        run(model, {**wan_inputs(batch=1), "timestep": torch.full((1,), 900)})
    del session.attend
    again = [run(model, {**wan_inputs(), "timestep": torch.full((2,), t)}) for t in (900, 800)]
    for a, b in zip(clean, again):
        assert torch.equal(a, b)
    handle.remove()


# ------------------------------------------------------------------------------ copies, other hooks, compile
def test_deepcopy_and_pickle_of_a_hooked_model_name_remove():
    model = tiny_wan()
    handle = sv.apply(model, **SPARSE)
    for how in (copy.deepcopy, pickle.dumps):
        with pytest.raises(TypeError, match=r"remove\(\)"):
            how(model)
    handle.remove()
    twin = copy.deepcopy(model)  # native again: copies as any model
    pickle.dumps(model)
    assert torch.equal(run(twin), run(model))


def test_an_accelerate_hook_added_after_apply_survives_remove():
    """What enable_model_cpu_offload installs; diffusers' remove_hook wrote the forward below ours over it."""
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

    calls = []

    class Count(ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            calls.append(1)
            return args, kwargs

    model = tiny_wan()
    native = run(model)
    handle = sv.apply(model, **SPARSE)
    add_hook_to_module(model, Count())
    run(model)
    handle.remove()
    assert torch.equal(run(model), native) and len(calls) == 2
    remove_hook_from_module(model)
    assert torch.equal(run(model), native) and len(calls) == 2


def test_inductor_compile_without_an_eager_forward_first():
    """The layout tables were built inside the compiled graph, where torch 2.13's CPU inductor
    miscompiles ``arange // n`` (index out of bounds on Wan)."""
    layout = sv.VideoLayout(3, 5, 7, tile=(2, 4), block_size=16)
    x = torch.randn(layout.num_tokens)
    gathered = torch.compile(lambda x: x.index_select(0, layout.on(x.device).perm[: x.shape[0]]))(x)
    assert torch.equal(gathered, x[sv.VideoLayout(3, 5, 7, tile=(2, 4), block_size=16).perm[:105]])
    model = tiny_wan()
    handle = sv.apply(model, **SPARSE)
    compiled = run(torch.compile(model))
    assert handle.sessions[0].tiled
    torch.testing.assert_close(compiled, run(model), rtol=1e-4, atol=1e-4)
    handle.remove()


def test_apply_to_a_compiled_model_says_apply_first():
    with pytest.raises(TypeError, match="apply on the model first"):
        sv.apply(torch.compile(tiny_wan()))


# ------------------------------------------------------------------------------ counts and caches
def test_stats_keep_the_last_counts_after_remove():
    model = tiny_wan()
    handle = sv.apply(model, **SPARSE)
    run(model)
    before = handle.stats()
    handle.remove()
    assert handle.stats() == before and before["sparse_calls"] == 2
    assert "removed" in repr(handle)


def test_the_layout_cache_is_bounded():
    model = tiny_hunyuan()
    handle = sv.apply(model, **SPARSE)
    for n in range(1, 24):  # a new prompt length each call: a new key-padding layout each (24 in all)
        run(model, hunyuan_inputs(text=24, padded=24 - n))
    assert len(handle.sessions[0]._layouts) <= 16
    handle.remove()


# ------------------------------------------------------------------------------ settings that did something else
def test_a_density_the_grid_cannot_honour_warns_once_with_the_block_size_that_would():
    model = tiny_wan()
    handle = sv.apply(model, method="draft", density=0.2, dense_layers=0, dense_steps=0)  # 128-token blocks
    with pytest.warns(UserWarning, match=r"density=0.2 asked .* 3 blocks of 128.*own block.*block_size=64") as seen:
        run(model, wan_inputs(height=8, width=14))
        run(model, wan_inputs(height=8, width=14, frames=2))
    assert len([w for w in seen if "density=" in str(w.message)]) == 1
    handle.remove()
    handle = sv.apply(model, method="draft", density=0.2, dense_layers=0, dense_steps=0, **TILING)
    with pytest.warns(UserWarning, match="no smaller block size honours it"):
        run(model, wan_inputs(height=3, width=5))  # 45 tokens: 3 blocks of 16
    handle.remove()
    handle = sv.apply(model, method="draft", density=0.3, dense_layers=0, dense_steps=0, **TILING)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(model)  # 105 tokens in 7 blocks: 0.3 is honoured
    handle.remove()


def test_dense_steps_covering_a_generation_warn_at_its_first_step():
    pipe = tiny_wan_pipeline()
    handle = sv.apply(pipe, method="draft", density=0.3, dense_layers=0, dense_steps=3, **TILING)
    with pytest.warns(UserWarning, match="all 3 of this generation's 3 steps dense"):
        pipe(**{**GENERATE, "height": 48, "width": 80, "num_inference_steps": 3})
    assert handle.stats()["sparse_calls"] == 0
    handle.remove()


def test_a_bare_transformer_reads_the_warm_up_from_the_pipelines_cache_context():
    """sv.apply(pipe) kept 20% of the steps dense, sv.apply(pipe.transformer) none."""
    pipe = tiny_wan_pipeline()
    counts = []
    for target in (pipe, pipe.transformer):
        handle = sv.apply(target, method="draft", density=0.3, dense_layers=0, **TILING)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            pipe(**{**GENERATE, "height": 48, "width": 80, "num_inference_steps": 5})
        counts.append((handle.stats()["dense_calls"], handle.stats()["sparse_calls"]))
        handle.remove()
    assert counts[0] == counts[1] == (1 * 2 * 2, 4 * 2 * 2)  # ceil(20% of 5) = 1 dense step


def test_a_bare_transformer_called_without_a_schedule_says_so():
    model = tiny_wan()
    handle = sv.apply(model, method="draft", density=0.3, dense_layers=0, **TILING)
    with pytest.warns(UserWarning, match="no leading step runs dense.*dense_steps=N"):
        run(model)
    handle.remove()
    handle = sv.apply(model, method="draft", density=0.3, dense_layers=0, dense_steps=0.2, **TILING)
    with pytest.raises(ValueError, match="dense_steps=0.2"):
        run(model)
    with model.cache_context("cond", step_index=0, num_inference_steps=10):
        run(model)  # 20% of 10: step 0 is dense
    assert handle.stats()["dense_calls"] == 2 and handle.stats()["sparse_calls"] == 0
    handle.remove()
    handle = sv.apply(model, method=None, reuse=sv.reuse.TokenReplay(rate=0.1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(model)  # native attention: no warm-up to speak of
    handle.remove()


def test_the_budget_used_is_stated():
    model = tiny_wan()
    handle = sv.apply(model, method="xattn", dense_steps=0, **TILING)
    assert handle.stats()["budget"] == "mass=0.9 (xattn's default)"
    assert "mass=0.9 (xattn's default)" in repr(handle)
    handle.remove()
    handle = sv.apply(model, method="draft", density=0.25, dense_steps=0)
    assert handle.stats()["budget"] == "density=0.25" and "density=0.25" in repr(handle)
    handle.remove()
