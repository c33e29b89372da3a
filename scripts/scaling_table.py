"""One table from several ``bench e2e`` runs of one model on 1, 2, 4 (, 8) GPUs (issue 26's scaling row).

Each argument is a run's ``--out`` folder (its ``e2e_<model>_<resolution>.json``). Rows are the runs'
configs with the parallelism stripped from their names ("draft, Ulysses x4" and "draft, Ulysses x2"
are one row); columns are each run's forward time and its speedup over the 1-GPU native forward
(the first run's ``native`` rows, or the ``native, 1 GPU`` row a parallel run times).

    python scripts/scaling_table.py out/scale1 out/scale2 out/scale4 --benchmarks-md BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys

from sparsevid.lab.bench.common import append_benchmarks, markdown_table

_PARALLEL = re.compile(r", (Ulysses x\d+( x ring x\d+)?|ring x\d+)$")


def _load(folder: str) -> dict:
    paths = sorted(glob.glob(os.path.join(folder, "e2e_*.json")))
    if len(paths) != 1:
        raise ValueError(f"Expect one e2e_*.json in {folder} but found {len(paths)}")
    with open(paths[0]) as f:
        return json.load(f)


def _one_gpu_native(run: dict) -> float:
    single = [r["forward_ms"] for r in run["rows"] if r["method"].startswith("native, 1 GPU")]
    native = [r["forward_ms"] for r in run["rows"] if r["method"].startswith("native (")]
    return single[0] if single else min(native)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="bench e2e --out folders, fewest GPUs first")
    parser.add_argument("--benchmarks-md", default=None, help="append the table to this file")
    args = parser.parse_args()
    runs = [_load(folder) for folder in args.runs]
    base = _one_gpu_native(runs[0])
    names, cells = [], {}
    for i, run in enumerate(runs):
        for r in run["rows"]:
            if r["method"].startswith("native, 1 GPU"):
                continue
            name = _PARALLEL.sub("", r["method"]).replace(" (default SDPA)", "").replace(" (cuDNN SDPA)", " cuDNN")
            name = f"{name} @ {r.get('budget', r['density'])}"
            if name not in names:
                names.append(name)
            cells[name, i] = r["forward_ms"]
    columns = ["config"] + [f"{run.get('gpus', 1)} GPU{'s' if run.get('gpus', 1) > 1 else ''} "
                            f"(U{run.get('ulysses', 1)} x R{run.get('ring', 1)}) ms, vs 1-GPU native" for run in runs]
    rows = [[name] + [f"{cells[name, i]:.0f}, {base / cells[name, i]:.2f}x" if (name, i) in cells else "-"
                      for i in range(len(runs))] for name in names]
    table = markdown_table(columns, rows)
    header = (f"Scaling of one model over {', '.join(str(r.get('gpus', 1)) for r in runs)} GPUs, from the runs: "
              + "; ".join(r["header"] for r in runs))
    print(table)
    if args.benchmarks_md:
        append_benchmarks(args.benchmarks_md, "bench e2e — scaling over GPUs", header, table,
                          command="python scripts/scaling_table.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
