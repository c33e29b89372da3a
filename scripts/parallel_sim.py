"""CPU simulation of sparse plans on several GPUs (issue 26): Ulysses head imbalance before and after
``head_balance``, and the ring steps a plan lets each rank skip.

Plans are real: the q/k of every self-attention layer of testbed-l (``--source testbed``: captured at
two consecutive forwards of a 20-step generation, ``--step`` and ``--step + 1``) or of
``sparsevid.lab.data.attention_inputs`` with Wan2.1-14B's 40 heads (``--source synthetic``). Per config:

- **imbalance** = the slowest Ulysses rank's computed score entries over the mean rank's (1.00 =
  balanced), with the model's head order, with the order :func:`sparsevid.parallel.head_balance.balanced_order`
  picks from the *previous* forward's plans (what ``head_balance=True`` does), and from the same
  forward's (the best this dealing can do). Mean over layers.
- **ring steps run** = the fraction of (rank, key chunk) steps that compute anything
  (:func:`sparsevid.parallel.ring.needed_steps`; 1.00 = none skipped). Mean over layers.

    PYTHONPATH=src python scripts/parallel_sim.py --source testbed --step 5
    PYTHONPATH=src python scripts/parallel_sim.py --source synthetic
"""

from __future__ import annotations

import argparse
import sys

import torch

import sparsevid as sv
from sparsevid.lab.bench.common import append_benchmarks, environment, markdown_table
from sparsevid.parallel.head_balance import balanced_order, imbalance
from sparsevid.parallel.ring import needed_steps

CONFIGS = {  # name: planner call
    "draft density=0.1 (per-head budget)": dict(method="draft", density=0.1),
    "draft mass=0.9": dict(method="draft", mass=0.9),
    "xattn (mass=0.9, its default)": dict(method="xattn"),
    "xattn density=0.1": dict(method="xattn", density=0.1),
}


def _testbed_layers(step: int, cache: str | None):
    """``[(grid, [(q, k), ...]) for forward step, step + 1]`` of testbed-l's first case."""
    from sparsevid.lab import testbed
    from sparsevid.lab.eval import LayerCapture

    if cache:
        import os

        path = os.path.join(cache, f"testbed_large_{step}.pt")
        if os.path.exists(path):
            return torch.load(path)
    tb = testbed.load_pipeline(name="large")
    forwards = []
    for s in (step, step + 1):
        capture = LayerCapture(tb.transformer, step=s)

        class _Stop(Exception):
            pass

        def stop(module, args, output, capture=capture):
            if capture.calls > capture.step:
                raise _Stop

        handle = tb.transformer.register_forward_hook(stop)
        try:
            tb(label=tb.labels[0], seed=0, steps=20)
        except _Stop:
            pass
        finally:
            handle.remove()
            capture.remove()
        forwards.append((capture.grid, [(q, k) for q, k, _, _ in capture.layers]))
    if cache:
        torch.save(forwards, path)
    return forwards


def _synthetic_layers():
    """Two 'forwards' (windows 0 and 1 of the clip, 4 seeds as layers) with 40 heads of head dim 64."""
    from sparsevid.lab.data import attention_inputs

    layout = sv.VideoLayout(16, 32, 32)
    forwards = []
    for start in (0, 1):
        layers = []
        for seed in range(4):
            q, k, _ = attention_inputs("bigbuckbunny", layout, heads=40, head_dim=64, seed=seed, start=start)
            layers.append((q, k))
        forwards.append(((16, 32, 32), layers))
    return forwards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", choices=["testbed", "synthetic"], default="testbed")
    parser.add_argument("--step", type=int, default=5, help="testbed forward to capture (and the next one)")
    parser.add_argument("--cache", default=None, help="folder to keep the testbed captures in")
    parser.add_argument("--ulysses", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--ring", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--benchmarks-md", default=None, help="append the table to this file")
    args = parser.parse_args()
    forwards = _testbed_layers(args.step, args.cache) if args.source == "testbed" else _synthetic_layers()
    (grid, before), (_, now) = forwards
    layout = sv.VideoLayout(*grid)
    heads = now[0][0].shape[1]
    ulysses = [u for u in args.ulysses if heads % u == 0 and heads // u > 1]
    rows = []
    for name, call in CONFIGS.items():
        costs_now, costs_before, steps = [], [], {r: [] for r in args.ring}
        for (q, k), (q0, k0) in zip(now, before):
            plan = sv.plan(q, k, layout, **call)
            costs_now.append(plan.density_per_head().sum(0))
            costs_before.append(sv.plan(q0, k0, layout, **call).density_per_head().sum(0))
            for r in args.ring:
                steps[r].append(float(needed_steps(plan, r).float().mean()))
        row = [name, f"{torch.stack(costs_now).mean():.3f}",
               f"{float((torch.stack(costs_now).amax(-1) / torch.stack(costs_now).amin(-1)).mean()):.2f}"]
        for u in ulysses:
            model = sum(imbalance(c, None, u) for c in costs_now) / len(now)
            lagged = sum(imbalance(c, balanced_order(c0, u), u) for c, c0 in zip(costs_now, costs_before)) / len(now)
            oracle = sum(imbalance(c, balanced_order(c, u), u) for c in costs_now) / len(now)
            row.append(f"{model:.3f} / {lagged:.3f} / {oracle:.3f}")
        row += [f"{sum(steps[r]) / len(steps[r]):.2f}" for r in args.ring]
        rows.append(row)
    columns = (["config", "mean density", "max/min head density"]
               + [f"imbalance U={u}: model / balanced (previous forward) / balanced (same forward)" for u in ulysses]
               + [f"ring steps run R={r}" for r in args.ring])
    source = (f"testbed-l q/k, forwards {args.step} and {args.step + 1} of a 20-step generation, {len(now)} layers"
              if args.source == "testbed" else f"attention_inputs('bigbuckbunny'), {len(now)} seeds as layers")
    header = (f"{environment()}; CPU simulation over real plans (counts of computed score entries, no timing): "
              f"{source}; grid {grid}, {heads} heads; imbalance = the slowest Ulysses rank's computed entries / "
              "the mean rank's, mean over layers; ring steps run = the (rank, key chunk) steps that compute "
              "anything, mean over layers")
    table = markdown_table(columns, rows)
    print(header)
    print(table)
    if args.benchmarks_md:
        append_benchmarks(args.benchmarks_md, f"parallel_sim — head balance and ring steps ({args.source})", header,
                          table, command="PYTHONPATH=src python scripts/parallel_sim.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
