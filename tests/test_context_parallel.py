"""sparsevid under diffusers context parallelism, on the CPU: 2 gloo processes, a tiny Wan.

Ulysses degree 2 must give exactly the single-process output with the same plans, whichever of
``sparsevid.apply`` and ``enable_parallelism`` comes first; ring attention is refused.
"""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("diffusers")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SCENARIOS = {  # name: (apply before enable_parallelism, ring attention)
    "apply-first": (True, False),
    "parallel-first": (False, False),
    "ring": (True, True),
}


def _worker(rank, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    # diffusers places rank r on accelerator r % device_count(); on a CPU-only machine that count is 0
    torch.accelerator.device_count = lambda: 1
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        import sparsevid as sv
        from diffusers import ContextParallelConfig
        from tiny_models import tiny_wan, wan_inputs

        inputs = wan_inputs(batch=1, frames=4, height=6, width=8)
        options = dict(method="draft", density=0.3, dense_layers=0, tile=(2, 4), block_size=16)
        for name, (apply_first, ring) in SCENARIOS.items():
            model = tiny_wan(num_layers=2, heads=4)  # enable_parallelism happens once per model
            with torch.no_grad():
                handle = sv.apply(model, **options)
                single = model(**inputs)[0]
                handle.remove()
                config = ContextParallelConfig(ulysses_degree=1 if ring else 2, ring_degree=2 if ring else 1)
                if apply_first:
                    handle = sv.apply(model, **options)
                    model.enable_parallelism(config=config)
                else:
                    model.enable_parallelism(config=config)
                    handle = sv.apply(model, **options)
                try:
                    parallel = model(**inputs)[0]
                    results[name, rank] = ("ok", float((parallel - single).abs().max()), handle.stats()["plans"])
                except NotImplementedError as exc:
                    results[name, rank] = ("refused", str(exc), 0)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results():
    shared = mp.Manager().dict()
    mp.spawn(_worker, args=(_free_port(), shared), nprocs=2, join=True)
    return dict(shared)


@pytest.mark.parametrize("order", ["apply-first", "parallel-first"])
def test_ulysses_degree_2_equals_single_process(results, order):
    for rank in (0, 1):
        status, diff, plans = results[order, rank]
        assert status == "ok" and diff == 0.0, results
        assert plans > 0  # the sparse path ran on every rank


def test_ring_attention_is_refused(results):
    for rank in (0, 1):
        status, message, _ = results["ring", rank]
        assert status == "refused" and "ulysses_degree" in message, results
