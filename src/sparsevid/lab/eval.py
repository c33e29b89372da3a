"""``python -m sparsevid eval``: does sparse attention change what the model generates?

For each case (label x seed) the pipeline generates a **dense** video, then one video per sparse
configuration (method x density x ``--dense-steps`` x ``--dense-layers`` x ``--replan-every``) from the
same seed, through :func:`sparsevid.apply` exactly as a user would run it. Reported per video:

- **PSNR** and **SSIM** of the sparse video against the dense one (torchmetrics, data range 1,
  frames as a batch; identical videos are reported as 100 dB), and the max absolute pixel
  difference;
- **achieved density**: mean ``plan.density`` over the sparse attention calls of the run;
- **time**: wall seconds of the whole generation (CUDA synchronised; planning included).

**Per-layer error** (the same inputs for dense and sparse): during each case's dense run the q, k,
v of every video self-attention layer are captured at one step (``--capture-step``; default the
first step that runs sparse under the warm-up, i.e. ``ceil(0.2 * steps)``), and each configuration's
plan is applied to them with :func:`sparsevid.plan` + :func:`sparsevid.sparse_attention`:
``||sparse - dense|| / ||dense||`` per layer, and ``kept_mass``, the true attention mass the plan
computes (:func:`sparsevid.lab.stats.plan_mass`; layers inside ``--dense-layers`` are reported too: the
error they *would* have).

**Temporal reuse** (``--reuse SPEC``, repeatable; SPEC as in ``bench e2e``, :mod:`sparsevid.reuse.spec`):
each ``--reuse`` value is one reuse setting (``replay:rate=0.3``; several joined by ``+`` act together,
``replay:rate=0.1+fbc:threshold=0.1``), passed as ``sv.apply(..., reuse=...)``. Every configuration
above runs without reuse *and* with each setting; ``--methods none`` (native attention) runs only
with each setting, measuring reuse alone. Rows carry ``reuse`` and, with token replay, the measured
``replay_rate`` (FFN rows replayed / rows seen). The per-layer error is of the attention plan alone:
reuse does not change it, so it is computed once per attention configuration (a reuse config's
summary reports its no-reuse twin's) and ``none`` has no per-layer rows. In the quality curve each
reuse setting is its own line; ``none`` sits at density 1 (full attention). The per-layer error is of a
fresh plan, so a ``--replan-every`` config reports its twin's that replans every step; what plans
reused across steps cost shows in its video and its per-step errors.

Writes to ``--out``: ``results.json`` (settings, per-video rows, per-layer rows, summary),
``videos.csv``, ``layers.csv``, ``summary.csv``, ``side_by_side_<label>_s<seed>.mp4`` and
``frames_<label>_s<seed>.png`` for the first ``--videos`` cases, ``quality_vs_density.png``.

**Attention statistics** (``--stats``): instead of the sparse generations, each case's dense run is
captured at ``--capture-step`` (and stopped there: later steps change nothing) and
:mod:`sparsevid.lab.stats` reports per layer x head the row entropy, the oracle mass a block or token
plan keeping 5/10/25% could keep, and the mass within ±1 frame and the query's tile neighbourhood
(blocks and tiles from ``--option block_size=``/``tile=`` when given). Writes ``stats.json``,
``stats.csv`` and ``attention_stats.png``.

Pipelines: ``--pipeline testbed`` (the project's trained DiT, :mod:`sparsevid.lab.testbed`; ``--testbed
large`` for testbed-l). Another
pipeline plugs in as an :class:`EvalTarget` in :data:`TARGETS` (load, cases, generate); the
rest of the harness only needs a pipeline-like object with ``.transformer``/``.scheduler``.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .bench.common import (add_budget_arguments, add_device_argument, add_option_argument, add_quant_argument,
                           add_reuse_argument, add_size_arguments, add_tail_argument, existing_file, non_negative_int,
                           output_folder, positive_int, time_ms)
from ..config import SparseVidConfig
from ..integrations.core import SdpaRoute
from ..planners import planners_taking
from ..reuse.spec import parse_reuse

__all__ = ["EvalTarget", "TARGETS", "Config", "add_arguments", "run", "evaluate", "capture_layers", "default_capture_step", "video_metrics"]

_PSNR_CAP = 100.0


# ---------------------------------------------------------------------------------------- targets
class EvalTarget:
    """How the harness drives one kind of pipeline. Subclass and add to :data:`TARGETS`."""

    name = "base"

    def load(self, args, device, dtype=None):
        """A pipeline-like object with ``.transformer`` and ``.scheduler`` (what ``sv.apply`` takes);
        ``dtype``: None = the pipeline's own (``--noise-floor`` loads a second one in float32)."""
        raise NotImplementedError

    def cases(self, pipe, args) -> list[dict]:
        """The generation requests, each a dict with at least ``seed`` (and e.g. ``label`` or ``prompt``)."""
        raise NotImplementedError

    def generate(self, pipe, case: dict, args, progress: bool) -> torch.Tensor:
        """One video ``(F, 3, H, W)`` in [0, 1] (CPU) for ``case``; deterministic for its seed."""
        raise NotImplementedError

    def layers(self, args) -> int | None:
        """The video self-attention layers of the pipeline ``load`` would return, known before loading it (so that
        ``--dense-layers`` is checked before any work); ``None``: not known until it is loaded."""
        return None


class TestbedTarget(EvalTarget):
    """The project's trained testbed (:func:`sparsevid.lab.testbed.load_pipeline`)."""

    __test__ = False
    name = "testbed"

    def load(self, args, device, dtype=None):
        from . import testbed

        large = getattr(args, "testbed", "small") == "large"
        if getattr(args, "held_out", 0) and not large:
            raise ValueError("Expect --held-out with --testbed large (the small testbed has no motion condition)")
        size = {"name": "large"} if large else {}  # small: the default
        pipe = testbed.load_pipeline(device=device, dtype=dtype, weights=getattr(args, "weights", None), **size)
        for key in ("frames", "height", "width"):  # unset: the testbed's native size
            if getattr(args, key, None) is None:
                setattr(args, key, pipe.spec.sample[key])
        return pipe

    def layers(self, args) -> int:
        from .testbed import SPECS

        return SPECS[getattr(args, "testbed", "small")].transformer["num_layers"]

    def cases(self, pipe, args) -> list[dict]:
        from .testbed.motion import held_out_cases

        labels = args.labels or list(pipe.labels)
        for label in labels:
            if label not in pipe.labels:
                raise ValueError(f"Expect --labels from {list(pipe.labels)} but got {label!r}")
        if getattr(args, "held_out", 0):  # conditions the training never drew (testbed-l's held-out motions)
            return held_out_cases(args.held_out, labels, len(pipe.labels), args.seeds)  # seed i, or --seeds cycled
        return [dict(label=label, seed=seed) for seed in (args.seeds or DEFAULT_SEEDS) for label in labels]

    def generate(self, pipe, case, args, progress):
        motion = {"motion": case["motion"]} if "motion" in case else {}
        return pipe(
            label=case["label"], seed=case["seed"], steps=args.steps, frames=args.frames,
            height=args.height, width=args.width, progress=progress, **motion,
        )


TARGETS: dict[str, EvalTarget] = {"testbed": TestbedTarget()}
DEFAULT_SEEDS = (0, 1, 2, 3)  # --seeds unset (with --held-out N: seed i for case i)


# ---------------------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class Config:
    """One configuration: what :func:`sparsevid.apply` is called with (method ``none``: native attention)."""

    method: str
    density: float | None
    dense_steps: int | float | None = None  # None: the integration's default (20% of the steps)
    dense_layers: int = 1
    reuse: str | None = None  # a --reuse SPEC; None: no reuse
    options: dict = field(default_factory=dict, compare=False, hash=False)
    mass: float | None = None  # a mass budget instead of a density (draft, xattn)
    quant: str | None = None  # 8-bit attention (sparsevid.apply(quant=...))
    tail: str | None = None  # summaries of the skipped blocks (sparsevid.apply(tail=...))
    replan_every: int = 1  # plans reused across steps (sparsevid.apply(replan_every=...))
    label: str | None = None  # shown instead of the generated name (which does not show ``options``)

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        warm = []
        if self.dense_steps is not None:
            warm.append(f"ds={self.dense_steps:g}")
        if self.dense_layers != 1:
            warm.append(f"dl={self.dense_layers}")
        if self.replan_every != 1:
            warm.append(f"replan={self.replan_every}")
        density = "" if self.method in ("dense", "none") else (
            f" mass={self.mass:g}" if self.mass is not None else f"@{self.density:g}")
        return (f"{self.method}{density}" + (f" {self.quant}" if self.quant else "")
                + (f" tail={self.tail}" if self.tail else "")
                + (f" ({', '.join(warm)})" if warm else "") + (f" + {self.reuse}" if self.reuse else ""))

    @property
    def attention(self) -> Config:
        """This configuration without reuse, replanning every step: the fresh plans the per-layer error measures."""
        return replace(self, reuse=None, replan_every=1)

    @property
    def settings(self) -> SparseVidConfig:
        """The :class:`~sparsevid.config.SparseVidConfig` that :func:`sparsevid.apply` gets."""
        return SparseVidConfig(None if self.method == "none" else self.method, self.density, self.mass,
                               self.dense_steps, self.dense_layers, planner_options=dict(self.options),
                               replan_every=self.replan_every, quant=self.quant, tail=self.tail)

    def check(self, device=None, layers: int | None = None) -> None:
        """Raise the error :func:`sparsevid.apply` would raise for this configuration, before any work
        (``layers``: the pipeline's video self-attention layers, where known)."""
        self.settings.validate(device=device, layers=layers, model="the pipeline's transformer")

    def apply(self, pipe):
        import sparsevid as sv

        return sv.apply(pipe, reuse=parse_reuse(self.reuse) if self.reuse else None, **self.settings.apply_options())


def _parse_dense_steps(text: str):
    if text in ("auto", "default", "none"):
        return None
    value = float(text)
    return value if ("." in text or "e" in text.lower()) else int(value)


def make_configs(methods, densities, dense_steps=(None,), dense_layers=(1,), reuse=(), options=None,
                 masses=(), quants=(), device=None, tails=(None,), layers: int | None = None,
                 replan_every=(1,)) -> list[Config]:
    """Every method x density x warm-up x ``replan_every``, each without reuse and with every ``reuse`` SPEC;
    ``none`` (native attention) with every SPEC only. ``options`` (planner keyword arguments, e.g.
    ``block_size``) go to every sparse config. ``masses``: also a config per mass budget for the
    methods that take one (declared at their registration: ``draft``, ``xattn``, ``finegrained``).
    ``quants``: every sparse config again with each 8-bit mode, and ``dense`` with it becomes quantized dense
    attention on every layer and step.
    ``tails``: every exact sparse config (not ``dense``, reuse or 8-bit ones) once per ``tail=`` value
    (``None``: skipped blocks dropped), the same plans with and without summaries in one run.
    ``device``: where they will run (an 8-bit mode no backend runs there is refused now); ``layers``: the
    pipeline's video self-attention layers, where known (``dense_layers`` must leave one sparse).
    ``replan_every``: plans reused across that many steps, one config per value (``dense`` replans every step:
    its plan is the same at every step).
    A configuration asked twice (a repeated density or tail) runs once.

    Raises:
        ValueError: a bad SPEC (named), ``none`` without any SPEC, a bad setting, or nothing left to run.
    """
    from ..reuse import split_reuse

    for spec in reuse:  # fail before any generation
        parsed = parse_reuse(spec)
        try:
            split_reuse(parsed)
        except ValueError as e:
            raise ValueError(f"{e} (--reuse {spec!r})") from e
    if "none" in methods and not reuse:
        raise ValueError("Expect --reuse SPEC with --methods none (native attention, reuse only) but got no --reuse")
    configs, seen = [], set()
    for method, density, ds, dl, every, spec in itertools.product(methods, densities, dense_steps, dense_layers,
                                                                 replan_every, [None, *reuse]):
        if method == "none":
            if spec is None:
                continue
            config = Config("none", None, reuse=spec)  # warm-up options only shape sparse attention
        elif method == "dense":
            config = Config(method, 1.0, ds, dl, spec, dict(options or {}))
        else:
            config = Config(method, density, ds, dl, spec, dict(options or {}), replan_every=every)
        if config not in seen:
            seen.add(config)
            configs.append(config)
    for method, mass, ds, dl, every in itertools.product(methods, masses, dense_steps, dense_layers, replan_every):
        if method in planners_taking("mass"):
            configs.append(Config(method, None, ds, dl, None, dict(options or {}), mass=mass, replan_every=every))
    skipped = {}
    for config, quant in itertools.product(list(configs), quants):
        if config.method == "dense":
            configs.append(replace(config, quant=quant, dense_steps=0, dense_layers=0))
        elif config.method != "none" and config.reuse is None:
            quantized = replace(config, quant=quant)
            try:
                quantized.check(device)
            except TypeError:  # token plans (finegrained): no 8-bit backend runs them
                skipped.setdefault(config.method, set()).add(quant)
                continue
            configs.append(quantized)
    for method, modes in skipped.items():
        print(f"[eval] no {'/'.join(sorted(modes))} configs for {method}: no 8-bit backend runs its plans")
    with_tail, seen, dropped = [], set(), []
    for config in configs:
        if config.method in ("dense", "none") or config.quant is not None or config.reuse is not None:
            with_tail.append(config)  # nothing skipped to summarise, or no tail pass (8-bit)
            continue
        for tail in tails:
            tailed = replace(config, tail=tail)
            if tailed in seen:
                continue
            seen.add(tailed)
            if tail is not None:
                try:
                    tailed.check(device)
                except TypeError:  # token plans (finegrained): no backend runs a tail on them
                    print(f"[eval] no tail={tail} config for {config.method}: its plans are not block plans")
                    dropped.append(f"{config.method} tail={tail}")
                    continue
            with_tail.append(tailed)
    configs = with_tail
    if not configs:
        raise ValueError("Expect at least one configuration to run but every one was dropped ("
                         + ", ".join(dict.fromkeys(dropped)) + ": its plans are not block plans); add --tail none, "
                         "or a method making block plans")
    for config in configs:  # every setting checked before any generation (as sparsevid.apply would)
        config.check(device, layers)
    return configs


# ---------------------------------------------------------------------------------------- metrics
def video_metrics(video: torch.Tensor, reference: torch.Tensor) -> dict:
    """PSNR (dB, capped at 100), SSIM and max abs difference of ``(F, 3, H, W)`` videos in [0, 1], and
    ``tdiff_err``: the relative L2 error of the frame-to-frame differences (motion) vs the reference's."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    video, reference = video.float(), reference.float()
    mse = float(F.mse_loss(video, reference))
    psnr = _PSNR_CAP if mse == 0 else min(_PSNR_CAP, float(peak_signal_noise_ratio(video, reference, data_range=1.0)))
    ssim = float(structural_similarity_index_measure(video, reference, data_range=1.0))
    motion, ref_motion = video.diff(dim=0), reference.diff(dim=0)
    tdiff = float((motion - ref_motion).norm() / ref_motion.norm().clamp_min(1e-12)) if len(video) > 1 else None
    return dict(psnr=psnr, ssim=ssim, max_abs_diff=float((video - reference).abs().max()), tdiff_err=tdiff)


# ---------------------------------------------------------------------------------------- capture
def default_capture_step(steps: int, capture_step: int | None = None) -> int:
    """The step whose attention is captured: ``capture_step``, by default the first step that runs sparse
    under the warm-up (``ceil(0.2 * steps)``), at most the last step."""
    return min(math.ceil(0.2 * steps) if capture_step is None else capture_step, steps - 1)


def _capture_sdpa(sink: list):
    """An SDPA route that records q, k, v, scale of self-attention calls (query and key of the same length)
    into ``sink`` and runs them as called."""

    def capture(sdpa, args, kwargs):
        names = ("query", "key", "value")
        q, k, v = (args[i] if i < len(args) else kwargs[names[i]] for i in range(3))
        if q.shape[-2] == k.shape[-2] and kwargs.get("attn_mask") is None and not kwargs.get("is_causal"):
            sink.append((q.detach().clone(), k.detach().clone(), v.detach().clone(), kwargs.get("scale")))
        return sdpa(*args, **kwargs)

    return SdpaRoute(capture)


class LayerCapture:
    """Hooks on a transformer: at forward number ``step`` of a generation, q/k/v of every video
    self-attention layer (the model registry, :mod:`sparsevid.integrations.models`, knows which modules) and the grid."""

    def __init__(self, transformer, step: int):
        from ..integrations.models import model_spec

        spec = model_spec(transformer)
        self.step, self.calls, self.grid, self.text_first = step, 0, None, spec.others == "first"
        self.layers: list[tuple] = []
        self._active = False
        self._handles = [transformer.register_forward_pre_hook(self._pre_transformer, with_kwargs=True)]
        for module in spec.self_attention(transformer):
            self._handles.append(module.register_forward_pre_hook(self._enter))
            self._handles.append(module.register_forward_hook(self._exit))
        self._spec, self._transformer = spec, transformer

    def _pre_transformer(self, module, args, kwargs):
        from ..integrations.models import bind_call

        self._active = self.calls == self.step
        if self._active:
            self.grid = self._spec.grid(module, bind_call(module, args, kwargs))
        self.calls += 1

    def _enter(self, module, args):
        if self._active:
            sink: list = []
            module._sparsevid_eval_capture = (_capture_sdpa(sink), sink)
            module._sparsevid_eval_capture[0].__enter__()

    def _exit(self, module, args, output):
        capture = getattr(module, "_sparsevid_eval_capture", None)
        if capture is not None:
            capture[0].__exit__(None, None, None)
            self.layers.extend(capture[1][:1])  # one self-attention call per module per forward
            del module._sparsevid_eval_capture

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def layer_errors(layers, grid, text_first: bool, configs: list[Config]) -> list[dict]:
    """Relative L2 error of each config's plan on each captured layer vs dense SDPA on the same q/k/v,
    and ``kept_mass``: the true attention mass the plan computes (:func:`sparsevid.lab.stats.plan_mass`,
    mean over heads)."""
    from .. import VideoLayout, sparse_attention
    from ..planners import plan as make_plan
    from .stats import plan_mass

    rows = []
    for index, (q, k, v, scale) in enumerate(layers):
        frames, height, width = grid
        layout = VideoLayout(frames, height, width, text_tokens=q.shape[-2] - frames * height * width, text_first=text_first)
        reference = F.scaled_dot_product_attention(q, k, v, scale=scale).float()
        timed = q.is_cuda  # kernel times beside the errors (GPU only)
        dense_ms = _gpu_ms(lambda: F.scaled_dot_product_attention(q, k, v, scale=scale)) if timed else None
        for config in configs:
            p = make_plan(q, k, layout, config.method, density=config.density, mass=config.mass, **config.options)
            call = lambda: sparse_attention(q, k, v, p, scale=scale, quant=config.quant, tail=config.tail)  # noqa: E731
            out = call().float()
            rows.append(dict(config=config.name, layer=index, density=float(p.density),
                             rel_err=float((out - reference).norm() / reference.norm()),
                             kept_mass=float(plan_mass(q, k, p, scale=scale).mean()), dense_ms=dense_ms,
                             attn_ms=_gpu_ms(call) if timed else None))
    return rows


class StepErrors:
    """Per-layer error at every sparse step of a generation, on its own trajectory: each sparse attention
    call's output against dense SDPA on the same q, k, v (a session observer; one host read per call,
    measurement only). Rows: ``step``, ``layer``, ``rel_err``."""

    def __init__(self, handle, **fields):
        self.rows: list[dict] = []
        self.fields = fields
        self.sessions = list(handle.sessions)
        for session in self.sessions:
            session.observers.append(self)

    @torch.no_grad()
    def __call__(self, layer, step, query, key, value, out, scale):
        reference = F.scaled_dot_product_attention(query, key, value, scale=scale).float()
        err = float((out.float() - reference).norm() / reference.norm().clamp_min(1e-30))
        self.rows.append(dict(self.fields, step=step, layer=layer, rel_err=err))

    def remove(self) -> None:
        for session in self.sessions:
            session.observers.remove(self)


def _gpu_ms(fn) -> float:
    """Median CUDA-event time of ``fn`` in ms (the kernel with its plan made: planning not included)."""
    return time_ms(fn, reps=10, warmup=3)


# ---------------------------------------------------------------------------------------- harness
def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _timed_generate(target, pipe, case, args, progress):
    _sync(pipe.device if hasattr(pipe, "device") else "cpu")
    start = time.perf_counter()
    video = target.generate(pipe, case, args, progress)
    _sync(pipe.device if hasattr(pipe, "device") else "cpu")
    return video, time.perf_counter() - start


def case_name(case: dict) -> str:
    label = case.get("label") or case.get("prompt", "case")[:24]
    return f"{label} seed {case['seed']}" + (" held-out" if "motion" in case else "")


def _case_fields(case: dict) -> dict:
    """The case as row fields (a Motion as its rounded fields)."""
    fields = dict(case)
    if "motion" in fields:
        m = fields["motion"]
        fields["motion"] = " ".join(f"{k}={round(v, 3) if isinstance(v, float) else v}" for k, v in asdict(m).items())
    return fields


def _noise_floor(target, pipe, case, args, dense, reference=None) -> dict | None:
    """PSNR/SSIM of the dense video in the pipeline's low precision vs float32 from the same seed
    (``reference``: a float32 pipeline with the same weights; None: ``pipe`` cast to float32 and back)."""
    if reference is not None:
        return video_metrics(dense, target.generate(reference, case, args, False))
    if getattr(pipe, "dtype", torch.float32) == torch.float32 or not hasattr(pipe, "to"):
        return None
    dtype = pipe.dtype
    pipe.to(dtype=torch.float32)
    try:
        video = target.generate(pipe, case, args, False)
    finally:
        pipe.to(dtype=dtype)
    return video_metrics(dense, video)


def evaluate(target: EvalTarget, pipe, args, configs: list[Config], keep_videos: int = 0, progress: bool = True,
             reference=None, checkpoint=None) -> dict:
    """Run every case dense and under every config. Returns per-video rows, per-layer rows (at the capture
    step, on the dense run's q/k/v), per-step rows (every sparse call of every generation against dense
    attention on its own inputs, when ``args.step_error``) and, for the first ``keep_videos`` cases, the
    videos themselves (``{case name: {config name: video}}``). ``reference``: a float32 copy of the
    pipeline for ``args.noise_floor`` (None: ``pipe`` cast to float32 and back). ``checkpoint(result)``:
    called after every configuration's video with the rows so far (so a cut-off run keeps them)."""
    cases = target.cases(pipe, args)
    capture_step = default_capture_step(args.steps, args.capture_step)
    video_rows, layer_rows, step_rows, kept = [], [], [], {}
    result = dict(videos=video_rows, layers=layer_rows, steps=step_rows, kept=kept, capture_step=capture_step)
    bar = tqdm(cases, desc="cases", unit="case", disable=not progress)
    for i, case in enumerate(bar):
        name = case_name(case)
        bar.set_postfix_str(name)
        capture = LayerCapture(pipe.transformer, capture_step) if args.layer_error else None
        try:
            dense, dense_s = _timed_generate(target, pipe, case, args, progress)
        finally:
            if capture is not None:
                capture.remove()
        videos = {"dense": dense}
        if capture is not None and capture.layers:
            attention = list(dict.fromkeys(c.attention for c in configs if c.method != "none"))
            for row in layer_errors(capture.layers, capture.grid, capture.text_first, attention):
                layer_rows.append(dict(case=name, **_case_fields(case), step=capture_step, **row))
        floor = _noise_floor(target, pipe, case, args, dense, reference) if getattr(args, "noise_floor", False) else None
        if floor is not None:
            video_rows.append(dict(case=name, **_case_fields(case), config=NOISE_FLOOR, method="dense", density=1.0,
                                   achieved=1.0, seconds=None, dense_seconds=dense_s, **floor))
        for config in configs:
            handle = config.apply(pipe)
            errors = StepErrors(handle, case=name, config=config.name) if getattr(args, "step_error", False) else None
            try:
                video, seconds = _timed_generate(target, pipe, case, args, progress)
                stats = handle.stats()
            finally:
                if errors is not None:
                    errors.remove()
                    step_rows.extend(errors.rows)
                handle.remove()
            metrics = video_metrics(video, dense)
            video_rows.append(dict(
                case=name, **_case_fields(case), config=config.name, method=config.method, density=config.density,
                mass=config.mass, quant=config.quant, dense_steps=config.dense_steps, dense_layers=config.dense_layers,
                replan_every=config.replan_every, reuse=config.reuse, achieved=stats["mean_density"],
                replay_rate=_replay_rate(stats), seconds=seconds, dense_seconds=dense_s, **metrics,
            ))
            videos[config.name] = video
            if checkpoint is not None:
                checkpoint(result)
        if i < keep_videos:
            kept[name] = videos
    return result


NOISE_FLOOR = "dense fp32 (noise floor)"


def _replay_rate(stats: dict) -> float | None:
    """Token replay's FFN rows replayed / rows seen in the run (the pipeline's transformer), if any."""
    token = stats["reuse"][0]["token_replay"] if stats.get("reuse") else None
    return token["replay_rate"] if token else None


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def summarize(video_rows: list[dict], layer_rows: list[dict], configs: list[Config],
              step_rows: list[dict] = ()) -> list[dict]:
    """Mean over cases per config (PSNR/SSIM/time/achieved density/replay rate), mean per-layer
    error (of the config's attention plans: a reuse config reports its no-reuse twin's), the per-step
    error over the generation (``step_err``: mean over every sparse call; ``step_err_max``: the worst
    (step, layer) cell's mean over cases) and, for a config with a tail, ``vs_no_tail``: the mean
    paired PSNR difference against the same config without one (same cases)."""
    psnr = {(r["case"], r["config"]): r["psnr"] for r in video_rows}
    step_cells: dict[str, list[dict]] = {}
    for cell in step_table(step_rows):
        step_cells.setdefault(cell["config"], []).append(cell)
    summary = []
    floor = Config("dense", 1.0)  # the noise-floor rows, if any, summarised like a config
    for config in [floor, *configs]:
        name = NOISE_FLOOR if config is floor else config.name
        rows = [r for r in video_rows if r["config"] == name]
        if not rows:
            continue
        attention = config.attention.name
        layers = [r for r in layer_rows if r["config"] == attention and r["layer"] >= config.dense_layers]
        errs = [r["rel_err"] for r in layers] if config is not floor else []
        mean = lambda key: _mean(r.get(key) for r in rows)  # noqa: E731
        attn_ms = _mean(r["attn_ms"] for r in layers)
        dense_ms = _mean(r["dense_ms"] for r in layers)
        cells = step_cells.get(name, [])
        paired = None
        if config.tail is not None:
            twin = replace(config, tail=None, label=None).name  # a label would name the twin as the config itself
            diffs = [r["psnr"] - psnr[(r["case"], twin)] for r in rows if (r["case"], twin) in psnr]
            paired = _mean(diffs)
        summary.append(dict(
            config=name, method=config.method, density=config.density, mass=config.mass, quant=config.quant,
            dense_steps=config.dense_steps, dense_layers=config.dense_layers, replan_every=config.replan_every,
            reuse=config.reuse, videos=len(rows),
            achieved=mean("achieved"), replay_rate=mean("replay_rate"), psnr=mean("psnr"),
            psnr_min=min(r["psnr"] for r in rows), ssim=mean("ssim"), ssim_min=min(r["ssim"] for r in rows),
            tdiff_err=mean("tdiff_err"), seconds=mean("seconds"), dense_seconds=mean("dense_seconds"),
            layer_err=_mean(errs), attn_ms=attn_ms, dense_attn_ms=dense_ms,
            attn_speedup=dense_ms / attn_ms if attn_ms and dense_ms else None, tail=config.tail,
            step_err=sum(c["rel_err"] * c["cases"] for c in cells) / sum(c["cases"] for c in cells) if cells else None,
            step_err_max=max((c["rel_err"] for c in cells), default=None), vs_no_tail=paired,
        ))
    return summary


def format_table(summary: list[dict]) -> str:
    width = max([26] + [len(r["config"]) for r in summary])
    replay = any(r["replay_rate"] is not None for r in summary)
    steps = any(r.get("step_err") is not None for r in summary)
    tails = any(r.get("tail") for r in summary)
    head = (f"{'config':<{width}} {'videos':>6} {'achieved':>8}" + (f" {'replayed':>8}" if replay else "")
            + f" {'PSNR dB':>8} {'min':>6} {'SSIM':>7} {'min':>7} {'tdiff':>6} {'layer err':>9}"
            + (f" {'step err':>8} {'max':>6}" if steps else "") + (f" {'vs none':>7}" if tails else "")
            + f" {'attn ms':>8} {'attn x':>6} {'time s':>7} {'dense s':>7}")
    lines = [head, "-" * len(head)]
    for r in summary:
        achieved = f"{r['achieved']:.3f}" if r["achieved"] is not None else "-"
        rate = (f" {r['replay_rate']:>8.3f}" if r["replay_rate"] is not None else f" {'-':>8}") if replay else ""
        err = f"{r['layer_err']:.4f}" if r["layer_err"] is not None else "-"
        fmt = lambda value, spec: "-" if value is None else format(value, spec)  # noqa: E731
        lines.append(
            f"{r['config']:<{width}} {r['videos']:>6} {achieved:>8}{rate} {r['psnr']:>8.2f} {r['psnr_min']:>6.1f} "
            f"{r['ssim']:>7.4f} {r['ssim_min']:>7.4f} {fmt(r['tdiff_err'], '.3f'):>6} {err:>9} "
            + (f"{fmt(r.get('step_err'), '.4f'):>8} {fmt(r.get('step_err_max'), '.3f'):>6} " if steps else "")
            + (f"{fmt(r.get('vs_no_tail'), '+.2f'):>7} " if tails else "")
            + f"{fmt(r['attn_ms'], '.3f'):>8} {fmt(r['attn_speedup'], '.2f'):>6} {fmt(r['seconds'], '.1f'):>7} {r['dense_seconds']:>7.1f}"
        )
    return "\n".join(lines)


def _write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def write_tables(out_dir: Path, result: dict, summary: list[dict], settings: dict) -> list[Path]:
    """The numbers: ``results.json``, ``table.txt`` and the CSVs (also written after every configuration)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    steps = step_table(result.get("steps", []))
    (out_dir / "results.json").write_text(json.dumps(
        dict(settings=settings, summary=summary, videos=result["videos"], layers=result["layers"], steps=steps),
        indent=1, default=str))
    (out_dir / "table.txt").write_text(format_table(summary) + "\n")
    files = [out_dir / "results.json", out_dir / "table.txt"]
    for name, rows in (("videos.csv", result["videos"]), ("layers.csv", result["layers"]),
                       ("steps.csv", steps), ("summary.csv", summary)):
        if rows:
            _write_csv(out_dir / name, rows)
            files.append(out_dir / name)
    return files


def step_table(step_rows: list[dict]) -> list[dict]:
    """Per (config, step, layer): the mean and max over cases of the per-call error (the per-layer x
    step table that shows where an approximation breaks)."""
    cells: dict[tuple, list] = {}
    for r in step_rows:
        cells.setdefault((r["config"], r["step"], r["layer"]), []).append(r["rel_err"])
    return [dict(config=c, step=st, layer=la, rel_err=_mean(e), rel_err_max=max(e), cases=len(e))
            for (c, st, la), e in cells.items()]


def write_outputs(out_dir: Path, result: dict, summary: list[dict], settings: dict, fps: int = 8) -> list[Path]:
    from . import viz

    files = write_tables(out_dir, result, summary, settings)
    steps = step_table(result.get("steps", []))
    if steps:
        files.append(_save_step_errors(steps, out_dir / "step_errors.png",
                                       f"{settings['pipeline']}: relative error of each sparse layer's attention vs "
                                       f"dense on the same inputs, every step (mean over {settings['cases']} videos)"))
    for case, videos in result["kept"].items():
        stem = slug(case.replace(" seed ", "_s"))
        files.append(viz.save_video_rows(videos, out_dir / f"frames_{stem}.png", title=f"{case}: dense vs sparse"))
    curves: dict[str, list] = {}
    for r in summary:
        achieved = 1.0 if r["method"] == "none" else r["achieved"]  # reuse alone: full attention
        if r["method"] == "dense" or achieved is None:
            continue
        key = _series(r) + (
            f" ds={r['dense_steps']}" if r["dense_steps"] is not None else "") + (
            f" dl={r['dense_layers']}" if r["dense_layers"] != 1 else "") + (
            f" replan={r['replan_every']}" if r["replan_every"] != 1 else "") + (f" + {r['reuse']}" if r["reuse"] else "")
        curves.setdefault(key, []).append((achieved, min(r["psnr"], 60.0), r["ssim"]))
    if curves:
        files.append(viz.save_quality_curves(curves, out_dir / "quality_vs_density.png",
                                             title=f"{settings['pipeline']}: sparse vs dense, mean over {settings['cases']} videos"))
    timed = [r for r in summary if r["attn_speedup"] is not None and r["method"] != "none"]
    if timed:
        files.append(_save_quality_vs_speed(timed, out_dir / "quality_vs_speed.png",
                                            f"{settings['pipeline']}: quality vs attention speed, {settings['cases']} videos"))
    if result["kept"] and viz.mp4_writer() is None:  # last: everything else is written whatever happens here
        print("[eval] side-by-side videos skipped: neither PyAV (pip install av) nor OpenCV is installed; "
              "the frames_*.png show the same cases")
    else:
        for case, videos in result["kept"].items():
            stem = slug(case.replace(" seed ", "_s"))
            files.append(viz.write_video(viz.side_by_side(videos), out_dir / f"side_by_side_{stem}.mp4", fps=fps))
    return files


def _series(r: dict) -> str:
    """The curve a summary row belongs to: its method, budget kind, 8-bit mode and tail."""
    return (r["method"] + (" mass" if r.get("mass") is not None else "") + (f" {r['quant']}" if r.get("quant") else "")
            + (f" tail={r['tail']}" if r.get("tail") else ""))


def _save_step_errors(cells: list[dict], path: Path, title: str) -> Path:
    """One layer x step heatmap of the mean per-call error per config, on one colour scale (a cell that
    stands out is where an approximation breaks)."""
    from .viz import _pyplot, save_figure

    plt = _pyplot()
    configs = list(dict.fromkeys(c["config"] for c in cells))
    steps = sorted({c["step"] for c in cells})
    layers = sorted({c["layer"] for c in cells})
    top = max(c["rel_err"] for c in cells)
    cols = min(4, len(configs))
    rows = math.ceil(len(configs) / cols)
    fig, grid_axes = plt.subplots(rows, cols + 1, figsize=(3.2 * cols + 0.8, 0.3 * len(layers) * rows + 1.4 * rows),
                                  squeeze=False, gridspec_kw={"width_ratios": [1] * cols + [0.06]})
    axes = grid_axes[:, :cols]
    for ax in grid_axes[1:, cols]:
        ax.axis("off")
    for ax, config in zip(axes.flat, configs):
        grid = torch.full((len(layers), len(steps)), float("nan"))
        for c in cells:
            if c["config"] == config:
                grid[layers.index(c["layer"]), steps.index(c["step"])] = c["rel_err"]
        image = ax.imshow(grid.numpy(), aspect="auto", vmin=0, vmax=top, cmap="magma",
                          extent=(steps[0] - 0.5, steps[-1] + 0.5, layers[-1] + 0.5, layers[0] - 0.5))
        ax.set_title(config, fontsize=8)
        ax.set(xlabel="step", ylabel="layer")
    for ax in list(axes.flat)[len(configs):]:
        ax.axis("off")
    fig.colorbar(image, cax=grid_axes[0, cols], label="rel. L2 error vs dense")
    return save_figure(fig, path, title)


def _save_quality_vs_speed(summary: list[dict], path: Path, title: str) -> Path:
    """PSNR vs the attention kernels' speedup over dense SDPA (mean over the sparse layers), one series
    per method (mass budgets and 8-bit modes their own), the noise floor as a line."""
    from .viz import _pyplot, save_figure

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.2, 4.4))
    series: dict[str, list] = {}
    for r in summary:
        series.setdefault(_series(r), []).append((r["attn_speedup"], min(r["psnr"], 60.0)))
    for key, points in sorted(series.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="s" if "mass" in key else "o", label=key)
    ax.set(xlabel="attention speedup over dense SDPA (kernel time, same GPU)", ylabel="PSNR vs dense (dB)", xscale="log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return save_figure(fig, path, title)


# ---------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pipeline", choices=sorted(TARGETS), default="testbed", help="what to evaluate (default: %(default)s)")
    parser.add_argument("--testbed", choices=["small", "large"], default="small",
                        help="which testbed with --pipeline testbed (default: %(default)s)")
    parser.add_argument("--weights", type=existing_file, default=None,
                        help="testbed weights file (default: the committed ones)")
    parser.add_argument("--labels", nargs="+", default=None, help="labels (default: all)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="seeds (default: 0 1 2 3; with --held-out N: case i gets seed i, or --seeds cycled)")
    parser.add_argument("--steps", type=positive_int, default=20, help="sampler steps (default: %(default)s)")
    add_size_arguments(parser)
    parser.add_argument("--held-out", type=non_negative_int, default=0, metavar="N",
                        help="testbed large: N cases with held-out motions (never drawn in training) instead of labels x seeds")
    add_quant_argument(parser, "also every sparse config with 8-bit attention; with --methods dense: quantized dense "
                               "attention")
    add_tail_argument(parser, "what the skipped blocks contribute, one config per value for every exact sparse config")
    parser.add_argument("--step-error", action=argparse.BooleanOptionalAction, default=True,
                        help="per-layer error at every sparse step of every generation, on its own trajectory "
                             "(steps.csv, step_errors.png; one dense attention per sparse call) (default: on)")
    parser.add_argument("--noise-floor", action=argparse.BooleanOptionalAction, default=None,
                        help="also dense in float32 vs the pipeline's dtype (default: on where that is not float32)")
    add_budget_arguments(parser, ["draft", "xattn", "window", "random"], [0.1, 0.25],
                         methods_help="planners, or 'none': native attention, run only with each --reuse",
                         masses="also a config per mass budget for the planners that take one (e.g. 0.8 0.9 0.95)")
    parser.add_argument("--dense-steps", type=_parse_dense_steps, nargs="+", default=[None],
                        help="warm-up steps run dense: int count, fraction, or 'auto' (20%%) (default: auto)")
    parser.add_argument("--dense-layers", type=int, nargs="+", default=[1], help="leading dense blocks (default: %(default)s)")
    parser.add_argument("--replan-every", type=positive_int, nargs="+", default=[1], metavar="N",
                        help="plans reused across N steps (sparsevid.apply(replan_every=N)), one config per value "
                             "(default: %(default)s)")
    add_reuse_argument(parser, "every config runs without reuse and with each setting")
    add_option_argument(parser, "planner option for every sparse config")
    parser.add_argument("--capture-step", type=non_negative_int, default=None, help="step whose q/k/v give the per-layer errors (default: first sparse step)")
    parser.add_argument("--stats", action="store_true",
                        help="attention statistics per layer x head at --capture-step instead of sparse generations "
                             "(stats.json, stats.csv, attention_stats.png)")
    parser.add_argument("--no-layer-error", dest="layer_error", action="store_false", help="skip the per-layer errors")
    parser.add_argument("--videos", type=non_negative_int, default=2, help="cases to write side-by-side videos and frame PNGs for (default: %(default)s)")
    add_device_argument(parser)
    parser.add_argument("--out", default="out/eval", help="output folder (default: %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _environment(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"CPU ({torch.get_num_threads()} threads), torch {torch.__version__}"


def run(args) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    target = TARGETS[args.pipeline]
    if args.capture_step is not None and args.capture_step >= args.steps:
        raise ValueError(f"Expect --capture-step below --steps={args.steps} but got {args.capture_step}")
    output_folder(args.out)
    if args.stats:
        return run_stats(target, args, device)
    configs = make_configs(args.methods, args.densities, args.dense_steps, args.dense_layers, args.reuse, dict(args.option),
                           masses=args.masses, quants=args.quant, device=device, tails=args.tail,
                           layers=target.layers(args), replan_every=args.replan_every)
    pipe = target.load(args, device)
    low_precision = getattr(pipe, "dtype", torch.float32) != torch.float32
    if args.noise_floor is None:
        args.noise_floor = low_precision
    elif args.noise_floor and not low_precision:
        print(f"[eval] --noise-floor skipped: the pipeline already runs in float32 on {device}")
        args.noise_floor = False
    reference = None
    if args.noise_floor:  # the same weights loaded in float32 (not the low-precision ones cast up)
        try:
            reference = target.load(args, device, dtype=torch.float32)
        except (NotImplementedError, TypeError):
            reference = None  # _noise_floor casts the pipeline to float32 and back
    cases = target.cases(pipe, args)
    print(f"[eval] {args.pipeline} on {_environment(device)}: {len(cases)} cases x ({len(configs)} configs + dense), "
          f"{args.steps} steps, {args.frames}x{args.height}x{args.width}"
          + (f", planner options {dict(args.option)}" if args.option else ""))
    start = time.perf_counter()
    settings = lambda result: dict(  # noqa: E731
        pipeline=args.pipeline, device=_environment(device), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        cases=len(cases), seeds=list(dict.fromkeys(c["seed"] for c in cases)),
        labels=args.labels or list(getattr(pipe, "labels", [])), steps=args.steps, testbed=getattr(args, "testbed", None),
        held_out=getattr(args, "held_out", 0), masses=args.masses, quant=args.quant, noise_floor=args.noise_floor,
        frames=args.frames, height=args.height, width=args.width, capture_step=result["capture_step"],
        configs=[dict(asdict(c), name=c.name) for c in configs], seconds=time.perf_counter() - start,
        weights_info=getattr(pipe, "info", None), tails=args.tail, step_error=args.step_error,
    )

    def checkpoint(result):  # the tables so far, after every configuration's video
        write_tables(Path(args.out), result, summarize(result["videos"], result["layers"], configs, result["steps"]),
                     settings(result))

    result = evaluate(target, pipe, args, configs, keep_videos=args.videos, progress=not args.quiet, reference=reference,
                      checkpoint=checkpoint)
    summary = summarize(result["videos"], result["layers"], configs, result["steps"])
    print(format_table(summary))
    done = settings(result)
    files = write_outputs(Path(args.out), result, summary, done)
    print(f"[eval] {done['seconds']:.0f} s; wrote " + ", ".join(str(f) for f in files))
    return 0


class _Captured(Exception):
    """Raised after the capture step's forward: the rest of the generation is not needed."""


def capture_layers(target: EvalTarget, pipe, case: dict, args, step: int) -> LayerCapture:
    """Generate ``case`` densely up to forward ``step`` and stop there: the capture holds q/k/v of every
    video self-attention layer at that step (later steps would change nothing in it)."""

    def stop(module, args_, output):
        if capture.calls > capture.step:
            raise _Captured

    capture = LayerCapture(pipe.transformer, step)
    handle = pipe.transformer.register_forward_hook(stop)
    try:
        target.generate(pipe, case, args, progress=False)
    except _Captured:
        pass
    finally:
        handle.remove()
        capture.remove()
    if not capture.layers:
        raise ValueError(f"Expect a capture step below the transformer calls of a generation but got {step}")
    return capture


def run_stats(target: EvalTarget, args, device) -> int:
    """``eval --stats``: capture every case's dense run at the capture step, report :mod:`sparsevid.lab.stats`."""
    from . import stats

    pipe = target.load(args, device)
    cases = target.cases(pipe, args)
    step = default_capture_step(args.steps, args.capture_step)
    tiling = {key: value for key, value in args.option if key in ("tile", "block_size")}
    print(f"[eval --stats] {args.pipeline} on {_environment(device)}: {len(cases)} cases, step {step} of {args.steps}, "
          f"{args.frames}x{args.height}x{args.width}" + (f", {tiling}" if tiling else ""))
    start, rows, grid = time.perf_counter(), [], None
    for case in tqdm(cases, desc="cases", unit="case", disable=args.quiet):
        capture = capture_layers(target, pipe, case, args, step)
        grid = capture.grid
        for row in stats.layer_stats(capture.layers, grid, capture.text_first, tiling=tiling):
            rows.append(dict(case=case_name(case), **row))
    settings = dict(pipeline=args.pipeline, testbed=getattr(args, "testbed", None), device=_environment(device),
                    date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), cases=len(cases), seeds=list(dict.fromkeys(c["seed"] for c in cases)),
                    labels=args.labels or list(getattr(pipe, "labels", [])), steps=args.steps, capture_step=step,
                    frames=args.frames, height=args.height, width=args.width, grid=list(grid), tiling=tiling,
                    fractions=list(stats.FRACTIONS), seconds=time.perf_counter() - start)
    print(stats.format_stats_table(stats.summarize_stats(rows)))
    files = stats.write_stats(Path(args.out), rows, settings)
    print(f"[eval --stats] {settings['seconds']:.0f} s; wrote " + ", ".join(str(f) for f in files))
    return 0
