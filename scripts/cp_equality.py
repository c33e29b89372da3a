"""Several GPUs vs one (issue 26's equality target): sparsevid under diffusers' context parallelism
against the same model's one-GPU sparse output, per parallel layout and tail.

Launch with ``torchrun --nproc_per_node N scripts/cp_equality.py --layouts 1x4 2x2 4x1`` (``UxR``:
Ulysses degree x ring degree, product N). Each layout builds the model afresh from the published
config of ``--model`` with ``--layers`` blocks and random weights (bf16; float32 in a CPU smoke run
with ``--model tiny-wan``), computes the sparse
forward on every rank alone, enables diffusers' parallelism, and compares (rank 0 prints the
largest absolute and the relative L2 difference of the outputs). A reference row compares two
one-GPU forwards of the same plans in another kernel order (``--backend reference`` vs the default),
the scale of bf16 rounding to judge the others by.
"""

from __future__ import annotations

import argparse
import os
import types

import torch
import torch.distributed as dist

import sparsevid as sv
from sparsevid.lab.bench.common import markdown_table
from sparsevid.lab.bench.e2e import MODELS, _build, _inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="wan2.1-1.3b", choices=sorted(MODELS))
    parser.add_argument("--resolution", default="480p")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--layouts", nargs="+", default=["1x2"], help="UxR: Ulysses degree x ring degree")
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--tail", nargs="+", default=["none", "pooled-var"])
    parser.add_argument("--head-balance", action="store_true")
    args = parser.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:  # a CPU smoke run (--model tiny-wan): diffusers maps rank r to accelerator r % device_count()
        torch.accelerator.device_count = lambda: 1
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    from diffusers import ContextParallelConfig

    spec = dict(MODELS[args.model])
    spec["config"] = {**spec["config"], "num_layers": args.layers}
    height, width = spec["resolutions"][args.resolution]
    inputs = _inputs(spec, spec["frames"], height, width, device)
    rows = []
    for layout in args.layouts:
        ulysses, ring = (int(x) for x in layout.split("x"))
        if ulysses * ring != world:
            raise ValueError(f"Expect layouts whose degrees multiply to {world} but got {layout}")
        for tail in args.tail:
            options = dict(method="draft", density=args.density, dense_layers=0, dense_steps=0,
                           tail=None if tail == "none" else tail, head_balance=args.head_balance)
            model = _build(spec, device)
            schedule = types.SimpleNamespace(step_index=5, timesteps=torch.linspace(999, 0, 50))
            target = types.SimpleNamespace(transformer=model, scheduler=schedule)
            with torch.no_grad():
                handle = sv.apply(target, **options)
                single = model(**inputs)[0].float()
                handle.remove()
                handle = sv.apply(target, **{**options, "backend": "reference"})
                reference = model(**inputs)[0].float()
                handle.remove()
                model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=ulysses, ring_degree=ring))
                handle = sv.apply(target, **options)
                outs = []
                for step in (5, 6):  # head balance applies its order from the second step
                    schedule.step_index = step
                    outs.append(model(**inputs)[0].float())
                handle.remove()
            for name, out in (("one GPU, reference backend", reference), (f"U{ulysses} x R{ring}", outs[-1])):
                diff = (out - single).abs().max().item()
                rel = ((out - single).norm() / single.norm()).item()
                rows.append([name, tail, f"{diff:.2e}", f"{rel:.2e}"])
            del model
            if device == "cuda":
                torch.cuda.empty_cache()
    if dist.get_rank() == 0:
        print(f"{args.model} {args.resolution}, {args.layers} blocks, random weights, "
              f"{'bf16' if device == 'cuda' else 'float32 (CPU smoke run)'}, draft density "
              f"{args.density}, every block sparse; vs the one-GPU sparse output (auto backend)"
              + (", head_balance" if args.head_balance else ""))
        print(markdown_table(["run", "tail", "max abs diff", "relative L2"], rows))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
