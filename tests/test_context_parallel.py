"""sparsevid under diffusers context parallelism, on the CPU: gloo processes, a tiny Wan.

Ulysses degree 2 must give exactly the single-process output with the same plans, whichever of
``sparsevid.apply`` and ``enable_parallelism`` comes first, and with head balance; ring attention
(degree 2 and 4, with and without the tail taken as it is: with the call's decision on it each rank
decides from its own rows) and hybrid Ulysses 2 x ring 2 must give it up to float
rounding (the ring merges its steps' partials in another summation order).
"""

import os
import socket
import types

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("diffusers")

from sparsevid.tail import TAIL_METHODS  # noqa: E402

FIXED = TAIL_METHODS["pooled-var"].fixed()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


OPTIONS = dict(method="draft", density=0.3, dense_layers=0, dense_steps=0, tile=(2, 4), block_size=16)
# name: (world size, apply before enable_parallelism, ulysses degree, ring degree, extra options)
SCENARIOS = {
    "apply-first": (2, True, 2, 1, {}),
    "parallel-first": (2, False, 2, 1, {}),
    "balance": (2, True, 2, 1, dict(head_balance=True, density=None, mass=0.6)),
    "ring": (2, True, 1, 2, {}),
    "ring-tail": (2, False, 1, 2, dict(tail=FIXED)),
    "ring-4": (4, True, 1, 4, {}),
    "hybrid": (4, True, 2, 2, dict(head_balance=True, density=None, mass=0.6)),
    "hybrid-tail": (4, False, 2, 2, dict(tail=FIXED)),
    "ring-finegrained": (2, True, 1, 2, dict(method="finegrained")),
}
STEPS = 3  # forwards per scenario, one denoising step each: head balance switches order from the second


def _worker(rank, world, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    # diffusers places rank r on accelerator r % device_count(); on a CPU-only machine that count is 0
    torch.accelerator.device_count = lambda: 1
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        import sparsevid as sv
        from diffusers import ContextParallelConfig
        from tiny_models import tiny_wan, wan_inputs

        inputs = wan_inputs(batch=1, frames=4, height=6, width=8)
        for name, (size, apply_first, ulysses, ring, extra) in SCENARIOS.items():
            if size != world:
                continue
            options = {**OPTIONS, **extra}
            model = tiny_wan(num_layers=2, heads=4)  # enable_parallelism happens once per model
            schedule = types.SimpleNamespace(step_index=0, timesteps=torch.linspace(999, 0, STEPS))
            target = types.SimpleNamespace(transformer=model, scheduler=schedule)
            with torch.no_grad():
                handle = sv.apply(target, **options)
                single = model(**inputs)[0]
                handle.remove()
                config = ContextParallelConfig(ulysses_degree=ulysses, ring_degree=ring)
                if apply_first:
                    handle = sv.apply(target, **options)
                    model.enable_parallelism(config=config)
                else:
                    model.enable_parallelism(config=config)
                    handle = sv.apply(target, **options)
                try:
                    diffs = []
                    for step in range(STEPS):
                        schedule.step_index = step
                        diffs.append(float((model(**inputs)[0] - single).abs().max()))
                    balanced = [s.current is not None for s in handle.sessions[0].head_balance._slots.values()]
                    results[name, rank] = ("ok", max(diffs), handle.stats()["plans"], sum(balanced))
                except NotImplementedError as exc:
                    results[name, rank] = ("refused", str(exc), 0, 0)
    finally:
        dist.destroy_process_group()


def _run(world):
    shared = mp.Manager().dict()
    mp.spawn(_worker, args=(world, _free_port(), shared), nprocs=world, join=True)
    return dict(shared)


@pytest.fixture(scope="module")
def results():
    return {**_run(2), **_run(4)}


def _ranks(name):
    return range(SCENARIOS[name][0])


@pytest.mark.parametrize("order", ["apply-first", "parallel-first"])
def test_ulysses_degree_2_equals_single_process(results, order):
    for rank in _ranks(order):
        status, diff, plans, _ = results[order, rank]
        assert status == "ok" and diff == 0.0, results
        assert plans > 0  # the sparse path ran on every rank


def test_head_balance_under_ulysses_is_exact(results):
    for rank in _ranks("balance"):
        status, diff, plans, balanced = results["balance", rank]
        assert status == "ok" and diff == 0.0, results
        assert balanced == 2  # both layers ran a balanced order after their first plan


@pytest.mark.parametrize("name", ["ring", "ring-tail", "ring-4", "hybrid", "hybrid-tail"])
def test_ring_and_hybrid_equal_single_process(results, name):
    for rank in _ranks(name):
        status, diff, plans, balanced = results[name, rank]
        assert status == "ok" and diff < 1e-4, results
        assert plans == 2 * STEPS  # every forward planned both layers on every rank
    if name == "hybrid":
        assert all(results[name, rank][3] == 2 for rank in _ranks(name))


def test_ring_refuses_token_plans(results):
    for rank in _ranks("ring-finegrained"):
        status, message, _, _ = results["ring-finegrained", rank]
        assert status == "refused" and "NYI" in message and "TokenPlan" in message, results
