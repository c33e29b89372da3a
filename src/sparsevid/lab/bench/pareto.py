"""``python -m sparsevid bench pareto``: the quality-vs-speed frontier of a grid of settings (DESIGN.md,
"The measure of quality: the frontier").

A **setting** is what :func:`sparsevid.apply` is called with: a method, a density or a mass budget, a
``tail=`` value and planner options. The grid is ``--methods`` x (``--densities`` + ``--masses``) x
``--tail`` x option sets; ``--option KEY=VALUE`` goes to every method, ``--option METHOD:KEY=VALUE`` to
that method only, and a key given several times is an axis of the grid (one setting per value), so any
registered planner and its options pass through unnamed here. The key ``tail`` sets ``tail=`` the same
way (``--option clustered:tail=none --option clustered:tail=centroid``): for that method it replaces the
``--tail`` axis. The key ``replan_every`` (an int >= 1, default 1) sets ``replan_every=`` of
:func:`sparsevid.apply` (plans reused across that many steps), not a planner option: ``--option
clustered:replan_every=1 --option clustered:replan_every=4`` is an axis of two settings, the second named
``(replan=4)``. Every setting is checked as
``sparsevid.apply`` checks it before any work; a combination no method can take (a mass budget for a
planner without one, a tail for a token plan) is left out with one line, but a value of any axis that
no combination takes is an error.

Measured, every setting in the same run:

- **speed** (``--shapes``): one transformer forward at a real model's shape, random weights, bf16, batch
  1, as ``bench e2e`` times it: native SDPA (PyTorch's default and cuDNN forced; the faster is the
  reference) and each setting with every step sparse (planning, clustering and tail included), the first
  block dense; one warm-up forward, then the median of ``--reps``, each forward a step after the last (so
  a forward plans as a generation's next step does: ``clustered`` from the last step's centroids). A
  setting with ``replan_every=N`` > 1 times ``--reps`` pairs: a planning forward (the plans of N steps
  before expired) and a forward reusing its plans (checked by the plans counted: a forward doing the
  other is an error); its ``forward_ms`` is amortised over N steps, ``(plan + (N - 1) * reuse) / N``,
  beside ``plan_forward_ms`` and ``reuse_forward_ms``, and its speedup is of that mean. ``wan1.3b-480p``
  (Wan2.1-1.3B, 81 frames 480x832), ``wan14b-720p`` (Wan2.1-14B, 81 frames 720x1280); ``tiny`` is a
  two-layer Wan for CPU smoke runs (not a benchmark). Without CUDA the full-size shapes are skipped with
  one line.
- **quality** (``--testbeds``): each testbed generates ``--cases`` videos dense and under every setting
  from the same seeds, through ``sparsevid.apply`` as ``eval`` runs them (``--steps``, the default
  warm-up: the first 20% of steps dense); PSNR, SSIM and ``tdiff`` (relative error of the frame
  differences) against the dense video, mean over cases. ``large`` (testbed-l) takes held-out
  motions (conditions training never drew; ``eval --held-out``); ``small`` has no motion condition:
  its cases are labels x seeds, seed 0 first.

The **frontier**, per shape and testbed: the settings no other setting beats on both forward speedup and
PSNR (native attention, at 1x with the dense video itself, is the anchor: a setting at or below 1x is
never on it). Written to ``--out``: ``pareto.txt`` (the table and the frontiers), ``pareto.csv`` (one row
per setting), ``pareto.json`` (settings, device, weights, rows, frontiers) after every shape and testbed,
and ``pareto.png`` (speedup on x, PSNR on y, one panel per shape and testbed, points labelled, the
frontier as a line). The testbed weights are recorded by the git commit that last changed them (a hash of
the file where git or the repository is absent). ``--record`` appends the table to ``--benchmarks-md``.

``--join`` takes the ``pareto.json`` of earlier runs: their shapes and testbeds join this run's settings by
name (each measurement keeps its device, and the header says where it came from), so a grid that does not
fit one session's command limit runs as several commands (e.g. the 14B shape alone, then the rest).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import hashlib
import itertools
import json
import math
import subprocess
import types
from dataclasses import replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .common import (add_record_arguments, add_tail_argument, append_benchmarks, check_bench_outputs, command_line,
                     environment, existing_file, fmt, fraction, markdown_table, option_pair, positive_int, time_ms)

# --shapes name -> (bench e2e model, resolution)
SHAPES = {
    "wan1.3b-480p": ("wan2.1-1.3b", "480p"),
    "wan14b-720p": ("wan2.1-14b", "720p"),
    "tiny": ("tiny-wan", "480p"),  # CPU smoke runs of this command, not a benchmark
}
TESTBEDS = {"large": "testbed-l", "small": "small testbed"}
_NATIVE = "native (dense)"


def scoped_option(text: str) -> tuple[str | None, str, object]:
    """``[METHOD:]KEY=VALUE`` -> ``(METHOD or None, KEY, value)``, the value as ``--option`` parses it."""
    head, sep, _ = text.partition("=")
    method, pair = None, text
    if sep and ":" in head:  # a key is an identifier: a colon before '=' names a method
        method, pair = text.split(":", 1)
        if not method:
            raise argparse.ArgumentTypeError(f"Expect --option METHOD:KEY=VALUE with a method name but got {text!r}")
    key, _, value = pair.partition("=")
    if key == "tail" and value:  # a tail name as written (pooled-var-32 is no Python word); none: off
        return method, key, None if value in ("none", "None") else value
    key, value = option_pair(pair)
    return method, key, value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--methods", nargs="+", default=["draft"], help="planners (default: %(default)s)")
    parser.add_argument("--densities", type=fraction, nargs="*", default=[0.05, 0.1, 0.25, 0.5],
                        help="densities, one setting each (default: %(default)s)")
    parser.add_argument("--masses", type=fraction, nargs="*", default=[],
                        help="mass budgets, one setting each besides the densities (methods that take one)")
    add_tail_argument(parser, "what the skipped blocks contribute, one setting each")
    parser.add_argument("--option", action="append", type=scoped_option, default=[], metavar="[METHOD:]KEY=VALUE",
                        help="planner option, repeatable: for every method, or with METHOD: for that one; a key "
                             "given several times is a grid axis (e.g. --option clustered:q_clusters=128 "
                             "--option clustered:q_clusters=512); the key tail sets tail= (none: off) for the "
                             "method instead of --tail; the key replan_every sets sparsevid.apply's replan_every "
                             "(speed amortised over its steps)")
    parser.add_argument("--shapes", nargs="*", choices=list(SHAPES), default=["wan1.3b-480p", "wan14b-720p"],
                        help="model shapes timed (random weights; none: no speed) (default: %(default)s)")
    parser.add_argument("--reps", type=positive_int, default=3,
                        help="timed forwards per setting and shape, median reported; with replan_every > 1, "
                             "planning and reusing forwards each (default: %(default)s)")
    parser.add_argument("--testbeds", nargs="*", choices=list(TESTBEDS), default=["large", "small"],
                        help="testbeds generating the videos (none: no quality) (default: %(default)s)")
    parser.add_argument("--cases", type=positive_int, default=8,
                        help="videos per testbed (testbed-l: held-out motions) (default: %(default)s)")
    parser.add_argument("--steps", type=positive_int, default=20, help="sampler steps (default: %(default)s)")
    for name in ("frames", "height", "width"):
        parser.add_argument(f"--{name}", type=positive_int, default=None,
                            help=f"testbed video {name}{' in px' if name != 'frames' else ''} "
                                 "(default: each testbed's native)")
    parser.add_argument("--join", nargs="+", type=existing_file, default=[], metavar="PARETO_JSON",
                        help="pareto.json of earlier runs: their shapes and testbeds (none measured here) join this "
                             "run's settings by name, each measurement keeping its device (split a grid over runs)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--out", default="out/pareto", help="output folder (default: %(default)s)")
    add_record_arguments(parser)


# ---------------------------------------------------------------------------------------- settings
def _option_sets(method: str, options: list[tuple[str | None, str, object]]) -> list[dict]:
    """Every combination of the values given for each key (unscoped or scoped to ``method``), keys in the
    order given."""
    values: dict[str, list] = {}
    for scope, key, value in options:
        if scope in (None, method) and value not in values.setdefault(key, []):
            values[key].append(value)
    return [dict(zip(values, combo)) for combo in itertools.product(*values.values())]


def make_settings(methods, densities, masses, tails, options, device=None) -> list:
    """The grid as :class:`sparsevid.lab.eval.Config` objects (their names carry the planner options), each
    checked as ``sparsevid.apply`` checks it. A combination that fails is left out with one line; a value
    of an axis (method, budget, tail, option value) that fails in every combination raises that error.

    Raises:
        ValueError / TypeError: a value no combination takes, or an option scoped to a method not in ``methods``.
    """
    from ..eval import Config

    strays = sorted({scope for scope, _, _ in options if scope is not None} - set(methods))
    if strays:
        raise ValueError(f"Expect --option METHOD:KEY=VALUE with METHOD in --methods {methods} but got "
                         f"{', '.join(strays)}")
    budgets = [(d, None) for d in densities] + [(None, m) for m in masses]
    if not budgets:
        raise ValueError("Expect at least one of --densities or --masses but got neither")
    settings, failures, works = [], [], set()
    for method in dict.fromkeys(methods):
        for opts, (density, mass) in itertools.product(_option_sets(method, options), budgets):
            opts = dict(opts)
            method_tails = [opts.pop("tail")] if "tail" in opts else tails  # the method's own tail axis
            every = opts.pop("replan_every", 1)  # a setting of sparsevid.apply, not a planner option
            for tail in method_tails:
                config = Config(method, density, options=opts, mass=mass, tail=tail, replan_every=every)
                if opts:
                    config = replace(config, label=config.name + " [" + ", ".join(f"{k}={v!r}" for k, v in opts.items())
                                     + "]")
                axes = {("method", method), ("budget", (density, mass)), ("tail", tail),
                        (("option", method, "replan_every"), repr(every)),
                        *((("option", method, k), repr(v)) for k, v in opts.items())}
                try:
                    config.check(device)
                except (ValueError, TypeError) as error:
                    failures.append((config, axes, error))
                    continue
                works |= axes
                settings.append(config)
    for config, axes, error in failures:
        if not axes <= works:  # some value of this combination works nowhere: the value is wrong
            raise type(error)(f"{error} (setting {config.name})")
        print(f"[pareto] {config.name} left out: {error}")
    return settings


# ---------------------------------------------------------------------------------------- frontier
def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points that no other point dominates, by increasing ``x`` (then ``y``).

    ``points``: ``(x, y)``, both larger is better (speedup, PSNR). A point is dominated by another with
    ``x`` and ``y`` both at least as large and one of them larger: equal points are both on the frontier.
    """
    front = [i for i, (x, y) in enumerate(points)
             if not any(ox >= x and oy >= y and (ox > x or oy > y) for ox, oy in points)]
    return sorted(front, key=lambda i: points[i])


def frontiers(rows: list[dict], shapes, testbeds) -> dict[str, list[str]]:
    """``{"<shape> x <testbed>": [setting, ...]}``: the frontier's settings by increasing speedup, native
    attention (1x, the dense video: infinite PSNR) among the points; each row's ``frontier`` lists its keys."""
    result = {}
    for row in rows:
        row["frontier"] = []
    for shape, testbed in itertools.product(shapes, testbeds):
        points, named = [], []
        for row in rows:
            speed, quality = row["speed"].get(shape), row["quality"].get(testbed)
            if row["setting"] == _NATIVE and speed:
                points.append((1.0, math.inf))
            elif speed and quality and speed.get("speedup") is not None:
                points.append((speed["speedup"], quality["psnr"]))
            else:
                continue
            named.append(row)
        if len(named) < 2:  # nothing measured beside native
            continue
        key = f"{shape} x {TESTBEDS[testbed]}"
        result[key] = [named[i]["setting"] for i in pareto_front(points)]
        for i in pareto_front(points):
            named[i]["frontier"].append(key)
    return result


# ---------------------------------------------------------------------------------------- speed
def measure_speed(shape: str, settings: list, reps: int, device: str, progress: bool,
                  checkpoint=None) -> tuple[dict, dict]:
    """Forward times at ``shape`` as ``bench e2e`` measures them: ``(native, {setting name: row})``, native
    default SDPA and cuDNN (the faster is 1x), each setting with every step sparse, timed as
    :func:`~sparsevid.lab.bench.e2e.time_sparse_forward` times it (each forward a step after the last; a setting
    replanning every N > 1 steps: its planning and reusing forwards, ``forward_ms`` the mean over N steps).
    ``checkpoint(native, rows)``: called after the native baselines and after every setting with what is
    measured so far (a run cut off keeps it)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from .e2e import MODELS, _build, _forward, _inputs, time_sparse_forward

    model_name, resolution = SHAPES[shape]
    spec = MODELS[model_name]
    height, width = spec["resolutions"][resolution]
    model = _build(spec, device)
    inputs = _inputs(spec, spec["frames"], height, width, device)
    # a generation mid-way (from step 5 of 50, every step sparse): sparsevid reads the step as inside a pipeline
    scheduler = types.SimpleNamespace(step_index=5, timesteps=torch.linspace(999, 0, 50))
    target = types.SimpleNamespace(transformer=model, scheduler=scheduler)

    def timed(fn, warmup=1):
        return time_ms(fn, reps=reps, warmup=warmup, device=device)

    native_ms = timed(lambda: _forward(model, inputs))
    cudnn_ms = math.inf
    if device == "cuda":
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            cudnn_ms = timed(lambda: _forward(model, inputs))
    best = min(native_ms, cudnn_ms)
    context = (lambda: sdpa_kernel([SDPBackend.CUDNN_ATTENTION])) if cudnn_ms < native_ms else contextlib.nullcontext
    tokens = ((spec["frames"] - 1) // 4 + 1) * (height // 16) * (width // 16)
    native = dict(default_sdpa_ms=native_ms, cudnn_ms=cudnn_ms if device == "cuda" else None, forward_ms=best,
                  video_tokens=tokens, model=model_name, resolution=resolution, reps=reps, device=_device_line(device))
    print(f"[pareto] {shape}: native {native_ms:.1f} ms, cuDNN {fmt(native['cudnn_ms'], '.1f')} ms")
    result = {}
    if checkpoint is not None:
        checkpoint(native, result)
    for config in tqdm(settings, desc=f"speed {shape}", unit="setting", disable=not progress):
        handle = replace(config, dense_steps=0).apply(target)
        try:
            with context():
                out, row = time_sparse_forward(model, inputs, scheduler, handle, config.replan_every, reps, device,
                                               config.name)
            stats = handle.stats()
        finally:
            handle.remove()
        result[config.name] = dict(**row, speedup=best / row["forward_ms"], achieved=stats["mean_density"],
                                   sparse_calls=stats["sparse_calls"], finite=bool(torch.isfinite(out).all()))
        if checkpoint is not None:
            checkpoint(native, result)
    return native, result


# ---------------------------------------------------------------------------------------- quality
class _FirstCases:
    """An eval target that keeps the first ``n`` cases of another (the small testbed's labels x seeds)."""

    def __init__(self, target, n: int):
        self.target, self.n = target, n

    def load(self, args, device, dtype=None):
        return self.target.load(args, device, dtype)

    def cases(self, pipe, args):
        return self.target.cases(pipe, args)[: self.n]

    def generate(self, pipe, case, args, progress):
        return self.target.generate(pipe, case, args, progress)


def measure_quality(testbed: str, settings: list, args, device: torch.device) -> tuple[dict, dict]:
    """PSNR/SSIM/tdiff vs dense on ``testbed`` as ``eval`` measures them, mean over cases: ``(run, {setting
    name: row})``, ``run`` the cases, sizes and the weights' version."""
    from ..eval import TestbedTarget, evaluate, summarize

    large = testbed == "large"
    options = argparse.Namespace(
        testbed=testbed, weights=None, labels=None, held_out=args.cases if large else 0,
        seeds=None if large else list(range(args.cases)), steps=args.steps, frames=args.frames, height=args.height,
        width=args.width, capture_step=None, layer_error=False, step_error=False, noise_floor=False)
    target = _FirstCases(TestbedTarget(), args.cases)
    pipe = target.load(options, device)
    result = evaluate(target, pipe, options, settings, progress=not args.quiet)
    summary = {r["config"]: r for r in summarize(result["videos"], [], settings)}
    run = dict(device=_device_line(device.type), count=args.cases, steps=args.steps, frames=options.frames,
               height=options.height, width=options.width, weights=weights_version(pipe.spec.weights),
               names=list(dict.fromkeys(r["case"] for r in result["videos"])))
    keys = ("psnr", "psnr_min", "ssim", "tdiff_err", "achieved", "videos")
    return run, {c.name: {k: summary[c.name][k] for k in keys} for c in settings}


def weights_version(path: Path) -> str:
    """``git <commit>``: the last commit that changed ``path`` (``+ uncommitted changes`` where the file
    differs from it); ``sha256 <digest>`` of the file where git or the repository is absent."""
    path = Path(path)

    def git(*argv) -> str:
        return subprocess.run(["git", *argv, "--", path.name], cwd=path.parent, capture_output=True, text=True,
                              timeout=60, check=True).stdout.strip()

    try:
        commit = git("log", "-1", "--format=%H")
        dirty = bool(git("status", "--porcelain"))
    except (OSError, subprocess.SubprocessError):
        commit = ""
    if commit:
        return f"git {commit}" + (" + uncommitted changes" if dirty else "")
    return "sha256 " + hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------- run
def load_joined(paths, shapes, testbeds) -> list[dict]:
    """The earlier runs of ``--join``, checked before any work: each a ``pareto.json``, no shape or testbed
    measured twice (here or in another file)."""
    runs, seen = [], {("shape", s): "this run" for s in shapes} | {("testbed", t): "this run" for t in testbeds}
    for path in paths:
        try:
            run = json.loads(Path(path).read_text())
            parts = [("shape", s) for s in run["native"]] + [("testbed", t) for t in run["testbed_runs"]]
            rows = run["rows"]
            if not all(isinstance(r["setting"], str) and isinstance(r["speed"], dict) for r in rows):
                raise TypeError
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ValueError(f"Expect --join files written by bench pareto (pareto.json) but {path} is not "
                             "one") from None
        for part in parts:
            if part in seen:
                raise ValueError(f"Expect each shape and testbed measured once but {part[0]} {part[1]} is in {path} "
                                 f"and {seen[part]}; leave it out of one of them")
            seen[part] = path
        runs.append(dict(run, path=str(path)))
    return runs


def run(args) -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = make_settings(args.methods, args.densities, args.masses, args.tail, args.option,
                             device=torch.device(device))
    check_bench_outputs(args)
    shapes = list(dict.fromkeys(args.shapes))
    testbeds = list(dict.fromkeys(args.testbeds))
    skipped = [s for s in shapes if device != "cuda" and s != "tiny"]
    if skipped:
        print(f"[pareto] speed at {', '.join(skipped)} skipped: no CUDA device here (full-size models)")
        shapes = [s for s in shapes if s not in skipped]
    joined = load_joined(args.join, shapes, testbeds)
    out = Path(args.out)
    rows = [dict(setting=_NATIVE, method=None, density=1.0, mass=None, tail=None, replan_every=None, options={},
                 speed={}, quality={})]
    rows += [dict(setting=c.name, method=c.method, density=c.density, mass=c.mass, tail=c.tail,
                  replan_every=c.replan_every, options=dict(c.options), speed={}, quality={}) for c in settings]
    record = dict(command=command_line(), environment=environment(), device=_device_line(device), shapes=shapes,
                  testbeds=testbeds, skipped_shapes=skipped, native={}, testbed_runs={}, joined=[])
    by_name = {r["setting"]: r for r in rows}
    for earlier in joined:  # its measurements beside this run's, settings matched by name
        for key in ("native", "testbed_runs"):
            record[key].update({k: dict(v, joined=earlier["path"]) for k, v in earlier[key].items()})
        for row in earlier["rows"]:
            if row["setting"] not in by_name:  # a setting of the earlier run only
                by_name[row["setting"]] = dict(row, speed={}, quality={})
                rows.append(by_name[row["setting"]])
            by_name[row["setting"]]["speed"].update(row["speed"])
            by_name[row["setting"]]["quality"].update(row["quality"])
        record["joined"].append(earlier["path"])
    print(f"[pareto] {len(settings)} settings x ({len(shapes)} shapes + {len(testbeds)} testbeds) on "
          f"{record['device']}")

    def fill(kind: str, key: str, measured: dict) -> None:
        for row in rows:
            if row["setting"] in measured:
                row[kind][key] = measured[row["setting"]]
        write_tables(out, rows, record)

    def speed_so_far(shape: str, native: dict, speed: dict) -> None:
        record["native"][shape] = native
        fill("speed", shape, {_NATIVE: dict(forward_ms=native["forward_ms"], speedup=1.0), **speed})

    for shape in shapes:
        measure_speed(shape, settings, args.reps, device, not args.quiet, checkpoint=functools.partial(speed_so_far, shape))
        if device == "cuda":  # the model is gone: its memory to the next one
            torch.cuda.empty_cache()
    for testbed in testbeds:
        record["testbed_runs"][testbed], quality = measure_quality(testbed, settings, args, torch.device(device))
        fill("quality", testbed, quality)
    header, table, fronts = write_tables(out, rows, record)
    shapes, testbeds = list(record["native"]), list(record["testbed_runs"])
    png = plot(rows, shapes, testbeds, out / "pareto.png", record["device"])
    print(header)
    print(table)
    print(fronts)
    print(f"[pareto] wrote {out / 'pareto.txt'}, {out / 'pareto.csv'}, {out / 'pareto.json'}, {png}")
    if args.record:
        append_benchmarks(args.benchmarks_md, "bench pareto — " + ", ".join(
            [*shapes, *(TESTBEDS[t] for t in testbeds)]), header, table, extra=fronts)
    return 0 if all(s.get("finite", True) for r in rows for s in r["speed"].values()) else 1


def _device_line(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU ({torch.get_num_threads()} threads)"


# ---------------------------------------------------------------------------------------- outputs
def _header(record: dict, rows: list[dict]) -> str:
    def where(part: dict) -> str:  # a measurement of another device or run says so
        device = f", on {part['device']}" if part["device"] != record["device"] else ""
        return device + (f", joined from {part['joined']}" if "joined" in part else "")

    parts = [record["environment"]]
    for shape, native in record["native"].items():
        parts.append(f"{shape}: {native['model']} {native['resolution']} ({native['video_tokens']} video tokens), "
                     f"random weights, batch 1, native forward {native['forward_ms']:.1f} ms (default SDPA "
                     f"{native['default_sdpa_ms']:.1f}, cuDNN {fmt(native['cudnn_ms'], '.1f')}), median of "
                     f"{native['reps']}{where(native)}")
    if record["native"]:
        amortised = sorted({s["replan_every"] for r in rows for s in r["speed"].values() if "replan_every" in s})
        parts.append("forward: one warm-up, then each forward a step later, every step sparse (planning and tail "
                     "included: a forward plans, from the last step's centroids where the planner keeps them), first "
                     "block dense; "
                     + (f"a setting replanning every N steps (N = {', '.join(map(str, amortised))}): its planning "
                        "forward and N - 1 forwards reusing those plans, amortised over N steps (plan and reuse times "
                        "in pareto.csv/json); " if amortised else "")
                     + "speedup vs the faster native SDPA")
    for testbed, run in record["testbed_runs"].items():
        parts.append(f"{TESTBEDS[testbed]}: {run['count']} {'held-out ' if testbed == 'large' else ''}cases "
                     f"({run['frames']}x{run['height']}x{run['width']}), {run['steps']} steps, default warm-up, "
                     f"vs dense; weights {run['weights']}{where(run)}")
    if record["skipped_shapes"]:
        parts.append(f"speed skipped (no CUDA): {', '.join(record['skipped_shapes'])}")
    return "; ".join(parts)


def format_table(rows: list[dict], record: dict) -> str:
    shapes = list(record["native"])
    testbeds = list(record["testbed_runs"])
    columns = ["setting"]
    for shape in shapes:
        columns += [f"{shape} ms", f"{shape} speedup"]
    for testbed in testbeds:
        name = TESTBEDS[testbed]
        columns += [f"{name} density", f"{name} PSNR", f"{name} SSIM", f"{name} tdiff"]
    columns.append("on the frontier of")
    lines = []
    for row in rows:
        cells = [row["setting"]]
        for shape in shapes:
            s = row["speed"].get(shape, {})
            cells += [fmt(s.get("forward_ms"), ".1f"), fmt(s.get("speedup"), ".2f") + ("x" if s else "")]
        for testbed in testbeds:
            q = row["quality"].get(testbed)
            if row["setting"] == _NATIVE:
                cells += ["1", "ref", "ref", "ref"]
            else:
                q = q or {}
                cells += [fmt(q.get("achieved"), ".3f"), fmt(q.get("psnr"), ".2f"), fmt(q.get("ssim"), ".4f"),
                          fmt(q.get("tdiff_err"), ".3f")]
        cells.append(", ".join(row.get("frontier", [])) or "-")
        lines.append(cells)
    return markdown_table(columns, lines)


def _format_frontiers(fronts: dict[str, list[str]], rows: list[dict]) -> str:
    if not fronts:
        return "No frontier: speed and quality were not both measured."
    by_name = {r["setting"]: r for r in rows}
    lines = ["Frontier (speedup, PSNR dB), by increasing speedup:"]
    for key, names in fronts.items():
        shape, testbed = key.split(" x ")
        testbed = next(t for t, label in TESTBEDS.items() if label == testbed)
        points = []
        for name in names:
            row = by_name[name]
            psnr = row["quality"].get(testbed, {}).get("psnr")
            quality = "dense" if psnr is None else f"{psnr:.2f}"
            points.append(f"{name} ({row['speed'][shape]['speedup']:.2f}x, {quality})")
        lines.append(f"- {key}: " + " -> ".join(points))
    return "\n".join(lines)


def _csv_rows(rows: list[dict], record: dict) -> list[dict]:
    flat = []
    for row in rows:
        out = dict(setting=row["setting"], method=row["method"], density=row["density"], mass=row["mass"],
                   tail=row["tail"], replan_every=row.get("replan_every"),  # absent from a joined older run's rows
                   options=json.dumps(row["options"], default=repr) if row["options"] else "")
        for shape in record["native"]:
            s = row["speed"].get(shape, {})
            out.update({f"{shape} {key}": s.get(key) for key in ("forward_ms", "speedup", "achieved", "plan_forward_ms",
                                                                  "reuse_forward_ms")})
        for testbed in record["testbed_runs"]:
            q = row["quality"].get(testbed, {})
            out.update({f"{testbed} {k}": q.get(k) for k in ("achieved", "psnr", "psnr_min", "ssim", "tdiff_err")})
        out["frontier"] = "; ".join(row.get("frontier", []))
        flat.append(out)
    return flat


def write_tables(out: Path, rows: list[dict], record: dict) -> tuple[str, str, str]:
    """``pareto.txt``, ``pareto.csv`` and ``pareto.json`` from what is measured so far; returns the header,
    the table and the frontiers as text."""
    fronts = frontiers(rows, list(record["native"]), list(record["testbed_runs"]))
    header, table, text = _header(record, rows), format_table(rows, record), _format_frontiers(fronts, rows)
    (out / "pareto.txt").write_text(f"{header}\n\n{table}\n\n{text}\n")
    flat = _csv_rows(rows, record)
    with open(out / "pareto.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(flat[0]))
        writer.writeheader()
        writer.writerows(flat)
    (out / "pareto.json").write_text(json.dumps(dict(record, header=header, rows=rows, frontiers=fronts), indent=1,
                                                default=repr))
    return header, table, text


def plot(rows: list[dict], shapes: list[str], testbeds: list[str], path: Path, device: str) -> Path:
    """One panel per shape x testbed: PSNR vs forward speedup, every setting labelled, the frontier as a
    line, native at 1x; without a shape, PSNR vs the achieved density per testbed."""
    from ..viz import _pyplot, save_figure

    plt = _pyplot()
    columns = shapes or [None]
    panels = max(1, len(testbeds))
    fig, axes = plt.subplots(panels, len(columns), figsize=(6.4 * len(columns), 4.6 * panels), squeeze=False)
    for (i, testbed), (j, shape) in itertools.product(enumerate(testbeds), enumerate(columns)):
        ax = axes[i, j]
        points = []
        for row in rows:
            q = row["quality"].get(testbed)
            x = row["speed"].get(shape, {}).get("speedup") if shape else (q or {}).get("achieved")
            if q is not None and x is not None:
                points.append((x, q["psnr"], row["setting"], f"{shape} x {TESTBEDS[testbed]}" in row["frontier"]))
        for x, y, name, on in points:
            ax.plot(x, y, "o", color="C3" if on else "C0", ms=5)
            ax.annotate(name, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        front = sorted((x, y) for x, y, _, on in points if on)
        if front:
            ax.plot(*zip(*front), "-", color="C3", lw=1.2, label="frontier")
        if shape:
            ax.axvline(1.0, color="grey", ls="--", lw=0.8, label="native")
            ax.set_xlabel(f"forward speedup vs native, {shape}")
            ax.legend(fontsize=7)
        else:
            ax.set_xlabel("achieved density (no shape timed)")
        ax.set_ylabel(f"{TESTBEDS[testbed]} PSNR vs dense (dB)")
        ax.grid(alpha=0.3)
    if not testbeds:
        axes[0, 0].text(0.5, 0.5, "no testbed: no quality measured", ha="center", transform=axes[0, 0].transAxes)
    return save_figure(fig, path, f"quality vs speed, {device}")
