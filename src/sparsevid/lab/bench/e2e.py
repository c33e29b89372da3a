"""``python -m sparsevid bench e2e``: full-size video transformers, native vs sparsevid, on the GPU.

The transformer is built from the model's published config with random weights (no hub), in
bf16 on the GPU. Measured, every contender in the same run:

- **forward**: one transformer forward (batch 1, as the pipelines call it per guidance branch)
  with native SDPA (PyTorch's default choice) and with SDPA forced to cuDNN; then with sparsevid
  at each method/density (planning included: a bare transformer replans every forward; the first
  ``--dense-layers`` blocks stay dense). Speedup is against the faster native variant.
- **loop** (``--steps N``): a whole N-step flow-matching denoising loop with classifier-free
  guidance (two forwards per step), native vs sparsevid with the default warm-up (the first 20% of
  steps dense), as a pipeline runs it minus the text encoder and VAE.

- **reuse** (``--reuse SPEC``, repeatable, combined into one ``reuse=`` list): temporal reuse on top
  of each sparse config (``--methods none``: reuse alone, native attention). SPEC
  (:mod:`sparsevid.reuse.spec`, several joined by ``+`` allowed) is
  ``replay:rate=0.3`` / ``replay:threshold=0.5`` (:class:`sparsevid.reuse.TokenReplay`),
  ``fbc:threshold=0.05`` (``FirstBlockCacheConfig``), ``taylorseer:cache_interval=5,use_lite_mode=True``
  (``TaylorSeerCacheConfig``; its default identifiers hook nothing in Wan),
  ``magcache:threshold=0.06,mag_ratios=[...]`` (``MagCacheConfig``; needs calibrated ratios). Token replay
  acts in the forward rows and the loop; step caches only in the loop (a repeated forward at one
  timestep would be skipped entirely). The loop opens ``cache_context("cond"/"uncond")`` per branch,
  as pipelines do.

- **several GPUs** (``--gpus N`` under ``torchrun``, ``--ring-degree R``): diffusers' context parallelism,
  Ulysses degree ``N/R`` times ring degree ``R``; a first row times each rank alone, the native rows run
  diffusers' own templates (ring: on cuDNN SDPA, which returns the log-sum-exp the ring merge needs).
  ``--head-balance on`` rows apply ``head_balance=True``; its head order comes from the first plans and
  applies where the layers next replan, so their timed forwards run ``--replan-every`` steps later.

Timings: CUDA events, warm-up, median of ``--reps``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import types

import torch
from tqdm import tqdm

from ...config import SparseVidConfig
from ...reuse.spec import parse_reuse, reuse_label
from .common import (add_budget_arguments, add_option_argument, add_record_arguments, add_reuse_argument,
                     add_tail_argument, append_benchmarks, check_bench_outputs, environment, markdown_table,
                     non_negative_int, positive_int, time_ms)

# Published transformer configs (diffusers format) and how each model's pipeline shapes its inputs.
MODELS = {
    "wan2.1-1.3b": dict(
        cls="WanTransformer3DModel",
        config=dict(
            patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
            text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
        ),
        frames=81, resolutions={"480p": (480, 832), "720p": (720, 1280)}, text=512, layout="bcfhw",
    ),
    "wan2.1-14b": dict(
        cls="WanTransformer3DModel",
        config=dict(
            patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
            text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
        ),
        frames=81, resolutions={"480p": (480, 832), "720p": (720, 1280)}, text=512, layout="bcfhw",
    ),
    "hunyuan": dict(
        cls="HunyuanVideoTransformer3DModel",
        config=dict(
            in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
            num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1,
            qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768,
            rope_theta=256.0, rope_axes_dim=(16, 56, 56),
        ),
        frames=129, resolutions={"480p": (480, 848), "720p": (720, 1280)}, text=256, layout="bcfhw",
    ),
    # a few-layer Wan for smoke tests of this command on the CPU (not a benchmark)
    "tiny-wan": dict(
        cls="WanTransformer3DModel",
        config=dict(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=64, in_channels=16, out_channels=16,
            text_dim=64, freq_dim=32, ffn_dim=128, num_layers=2, cross_attn_norm=True, rope_max_seq_len=64,
        ),
        frames=9, resolutions={"480p": (128, 224)}, text=8, layout="bcfhw", text_dim=64,
    ),
    "cogvideox": dict(
        cls="CogVideoXTransformer3DModel",
        config=dict(
            num_attention_heads=48, attention_head_dim=64, in_channels=16, out_channels=16, time_embed_dim=512,
            text_embed_dim=4096, num_layers=42, sample_width=90, sample_height=60, sample_frames=49, patch_size=2,
            temporal_compression_ratio=4, max_text_seq_length=226, use_rotary_positional_embeddings=True,
        ),
        frames=49, resolutions={"480p": (480, 720)}, text=226, layout="bfchw",
    ),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=sorted(MODELS), default="wan2.1-1.3b", help="default: %(default)s")
    parser.add_argument("--resolution", default="480p", help="480p or 720p (default: %(default)s)")
    parser.add_argument("--frames", type=positive_int, default=None, help="video frames (default: the model's usual)")
    add_budget_arguments(parser, ["draft"], [0.1], nargs="*",
                         masses="mass budgets, one row each besides the densities (e.g. --masses 0.9 --densities)")
    parser.add_argument("--dense-layers", type=int, default=1, help="leading dense blocks (default: %(default)s)")
    parser.add_argument("--replan-every", type=int, default=1,
                        help="recompute plans every k denoising steps (default: %(default)s); with k > 1 the forward "
                             "rows time cached plans (repeated forwards stay on one step)")
    add_option_argument(parser, "planner option")
    add_reuse_argument(parser, "combined into one reuse= list on top of each sparse config (see the module docstring)")
    parser.add_argument("--steps", type=non_negative_int, default=0, help="also time a whole N-step CFG loop (0: forward only)")
    parser.add_argument("--gpus", type=positive_int, default=1,
                        help="context parallelism over N GPUs (diffusers' enable_parallelism; Ulysses unless "
                             "--ring-degree); launch with "
                             "`torchrun --nproc_per_node N -m sparsevid bench e2e --gpus N ...`")
    parser.add_argument("--ring-degree", type=int, default=1,
                        help="ring attention degree R of --gpus N (Ulysses degree N/R: R = N is ring, 1 < R < N "
                             "hybrid); the native rows then run diffusers' ring template on cuDNN SDPA "
                             "(default: %(default)s)")
    parser.add_argument("--head-balance", nargs="+", choices=["off", "on"], default=["off"],
                        help="sparsevid.apply's head_balance (Ulysses head order by plan cost), one row each "
                             "(default: %(default)s)")
    parser.add_argument("--backends", nargs="+", default=["auto"],
                        help="sparse_attention backends to time, one row each (default: %(default)s)")
    add_tail_argument(parser, "what the skipped blocks contribute, one config each")
    parser.add_argument("--tile-order", nargs="+", choices=["auto", "on", "off"], default=["auto"],
                        help="keep the video tokens in tile order through the model (sparsevid.apply's tile_order): "
                             "'auto' (where the model allows it), 'on', 'off'; several: one row each")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one native and one sparse forward (torch profiler): wall time, GPU time, "
                             "host syncs, top kernels, written to --out")
    parser.add_argument("--reps", type=positive_int, default=5, help="timed repetitions per forward (default: %(default)s)")
    parser.add_argument("--out", default="out/bench", help="folder for results.json (default: %(default)s)")
    add_record_arguments(parser)


_TILE_ORDERS = {"auto": None, "on": True, "off": False}  # --tile-order -> sparsevid.apply's tile_order


def _config(args, method: str, budget: tuple[str, float], backend: str, order: str, tail: str | None,
            balance: bool) -> SparseVidConfig:
    """The settings of one row (``method`` ``none``: native attention, reuse alone)."""
    common = dict(dense_layers=args.dense_layers, replan_every=args.replan_every, backend=backend)
    if method == "none":
        return SparseVidConfig(None, **common)
    kind, amount = budget
    return SparseVidConfig(method, amount if kind == "density" else None, amount if kind == "mass" else None,
                           planner_options=dict(args.option), tile_order=_TILE_ORDERS[order], tail=tail,
                           head_balance=balance, **common)


def _attention_layers(spec) -> tuple[int, bool]:
    """The model's video self-attention layers and whether other tokens share their sequence, from the model
    registry, on a model built on the meta device (no memory, no weights): known before any work."""
    import diffusers

    from ...integrations.models import model_spec

    with torch.device("meta"):
        model = getattr(diffusers, spec["cls"])(**spec["config"])
    entry = model_spec(model)
    return len(entry.self_attention(model)), entry.others is not None


def _build(spec, device) -> torch.nn.Module:
    import diffusers

    cls = getattr(diffusers, spec["cls"])
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16 if device == "cuda" else torch.float32)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            model = cls(**spec["config"])
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def _inputs(spec, frames: int, height: int, width: int, device: str) -> dict:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator(device).manual_seed(0)
    text_dim = spec.get("text_dim", 4096)
    latent = ((frames - 1) // 4 + 1, height // 8, width // 8)
    shape = (1, 16, *latent) if spec["layout"] == "bcfhw" else (1, latent[0], 16, *latent[1:])
    kwargs = dict(
        hidden_states=torch.randn(shape, generator=g, device=device, dtype=dtype),
        timestep=torch.tensor([999], device=device),
        encoder_hidden_states=torch.randn(1, spec["text"], text_dim, generator=g, device=device, dtype=dtype),
        return_dict=False,
    )
    if spec["cls"] == "HunyuanVideoTransformer3DModel":
        kwargs.update(
            encoder_attention_mask=torch.ones(1, spec["text"], device=device, dtype=torch.long),
            pooled_projections=torch.randn(1, 768, generator=g, device=device, dtype=dtype),
            guidance=torch.tensor([6000.0], device=device, dtype=dtype),
        )
    return kwargs


def _forward(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


def time_sparse_forward(model, inputs, scheduler, handle, every: int, reps: int, device: str, name: str
                        ) -> tuple[torch.Tensor, dict]:
    """A sparse setting's forward time mid-generation: ``(output of the warm-up forward, row)``, the row's
    ``forward_ms`` the median of ``reps``.

    ``scheduler`` is the stand-in whose ``step_index`` sparsevid reads (``handle`` applied on its target). The
    warm-up forward (compilation, first plans) runs at step 5; each timed forward stands one step after the last:
    a forward repeated at one step would be another call of that step (a CFG branch), with plans and centroids
    of its own, so it would neither reuse plans nor warm-start them. With ``every`` (the setting's
    ``replan_every``) 1 every forward plans, from the last step's centroids where the planner keeps them. With
    ``every`` > 1 the planning and the reusing forwards are timed apart (``reps`` pairs: a forward ``every`` steps
    after the last plan, then one a step later) and ``forward_ms`` is their mean over ``every`` steps; the row
    adds ``replan_every``, ``plan_forward_ms`` and ``reuse_forward_ms``.

    Raises:
        RuntimeError: a planning forward made no plan, or a reusing forward made one, or a setting with a planner
            made no sparse call (its time would be native attention's) (``handle.stats()``).
    """
    def forward_at(step: int):
        scheduler.step_index = step
        return _forward(model, inputs)

    out = forward_at(5)
    if handle.config.method is not None and not handle.stats()["sparse_calls"]:
        raise RuntimeError(f"Expect sparse attention calls in the forward of {name} but sparsevid counted none; its "
                           "time would be native attention's")
    if every == 1:
        return out, dict(forward_ms=time_ms(lambda: forward_at(scheduler.step_index + 1), reps=reps, warmup=0,
                                            device=device))
    planned, times = 5, ([], [])
    for _ in range(reps):
        for step, kept, plans_expected in ((planned + every, times[0], True), (planned + every + 1, times[1], False)):
            before = handle.stats()["plans"]
            kept.append(time_ms(functools.partial(forward_at, step), reps=1, warmup=0, device=device))
            made = handle.stats()["plans"] - before
            if (made > 0) != plans_expected:
                raise RuntimeError(f"Expect the {'planning' if plans_expected else 'reusing'} forward of {name} at step "
                                   f"{step} to make {'new plans' if plans_expected else 'no plan'} but it made {made}")
        planned += every
    plan_ms, reuse_ms = statistics.median(times[0]), statistics.median(times[1])
    return out, dict(forward_ms=(plan_ms + (every - 1) * reuse_ms) / every, replan_every=every,
                     plan_forward_ms=plan_ms, reuse_forward_ms=reuse_ms)


def _profile(model, inputs, context, name: str, out_dir: str) -> dict:
    """One forward under the torch profiler: wall time, summed GPU kernel time, host syncs, kernel count;
    the top operators go to ``out_dir/profile_<name>.txt``."""
    import re
    import time

    from torch.profiler import ProfilerActivity, profile

    with context():
        _forward(model, inputs)  # warm
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            start = time.perf_counter()
            _forward(model, inputs)
            torch.cuda.synchronize()
            wall_ms = (time.perf_counter() - start) * 1e3
    events = [e for e in prof.events() if e.device_type.name == "CUDA"]
    gpu_ms = sum(e.device_time for e in events) / 1e3
    averages = prof.key_averages()
    syncs = sum(e.count for e in averages if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize")
                or ("Memcpy" in e.key and "DtoH" in e.key))
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "profile_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", name) + ".txt")
    with open(path, "w") as f:
        f.write(averages.table(sort_by="cuda_time_total", row_limit=40))
    print(f"[e2e] profile {name}: wall {wall_ms:.1f} ms, GPU kernels {gpu_ms:.1f} ms, {syncs} host syncs -> {path}")
    return dict(name=name, wall_ms=wall_ms, gpu_ms=gpu_ms, syncs=syncs, kernels=len(events))


def _loop(model, inputs, steps: int, schedule, device: str, desc: str) -> float:
    """Seconds for ``steps`` flow-matching Euler steps, two guidance branches per step.

    ``schedule.timesteps`` is set to the loop's timesteps, so a sparsevid handle applied with
    ``scheduler=schedule`` sees the step index as it would inside a pipeline.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=5.0)
    scheduler.set_timesteps(steps, device=device)
    schedule.timesteps = scheduler.timesteps
    from ...reuse import cache_context

    uncond = {**inputs, "encoder_hidden_states": torch.zeros_like(inputs["encoder_hidden_states"])}

    def denoise():
        latents = inputs["hidden_states"].clone()
        for t in tqdm(scheduler.timesteps, desc=desc, unit="step", leave=False):
            step_t = t.expand(1)
            with cache_context(model, "cond"):
                cond = _forward(model, {**inputs, "hidden_states": latents, "timestep": step_t})
            with cache_context(model, "uncond"):
                free = _forward(model, {**uncond, "hidden_states": latents, "timestep": step_t})
            latents = scheduler.step(free + 5.0 * (cond - free), t, latents, return_dict=False)[0]
        scheduler._step_index = None  # rewind for the next loop

    return time_ms(denoise, reps=1, warmup=0, device=device) / 1e3


def _init_distributed(gpus: int, device: str) -> tuple[int, int]:
    """``(rank, world)``; a ``ValueError`` when ``--gpus`` and the launch disagree."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if gpus != world:
        raise ValueError(f"Expect WORLD_SIZE={gpus} for --gpus {gpus} but this process sees WORLD_SIZE={world}; launch "
                         f"`torchrun --nproc_per_node {gpus} -m sparsevid bench e2e --gpus {gpus} ...`")
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    else:  # CPU smoke runs: diffusers maps rank r to accelerator r % device_count(), which is 0 here
        torch.accelerator.device_count = lambda: 1
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return dist.get_rank(), world


def run(args) -> int:
    import sparsevid as sv

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and args.model != "tiny-wan":
        raise ValueError(f"Expect a CUDA GPU for --model {args.model} (a full-size video transformer) but this process "
                         "has none; on the CPU only --model tiny-wan runs")
    spec = MODELS[args.model]
    if args.resolution not in spec["resolutions"]:
        raise ValueError(f"Expect --resolution in {sorted(spec['resolutions'])} for {args.model} but got {args.resolution}")
    options = dict(args.option)
    reuse = parse_reuse(args.reuse)
    tails = args.tail
    ring = args.ring_degree
    if ring < 1 or args.gpus % ring:
        raise ValueError(f"Expect --ring-degree dividing --gpus {args.gpus} but got {ring}")
    if ring > 1 and device != "cuda" and (args.dense_layers or args.steps):
        # dense layers and warm-up steps run diffusers' ring template, which merges by log-sum-exp: no CPU backend
        raise ValueError(f"Expect --dense-layers 0 and --steps 0 for a ring run on the CPU (diffusers' native ring "
                         f"attention needs a CUDA backend returning log-sum-exp) but got --dense-layers "
                         f"{args.dense_layers}, --steps {args.steps}")
    layers, text_tokens = _attention_layers(spec)
    variants = [(b, t) for b in args.backends for t in args.tile_order]
    balances = [b == "on" for b in args.head_balance]
    budgets = [("density", d) for d in args.densities] + [("mass", m) for m in args.masses]  # one row each
    jobs = [(m, bu, b, t, tail, hb) for m in args.methods for bu in (budgets if m != "none" else [("density", 1.0)])
            for b, t in variants for tail in (tails if m != "none" else [None])
            for hb in (balances if m != "none" else [False])]
    configs = [_config(args, *job) for job in jobs]
    for config in configs:  # every setting refused before any work, as sparsevid.apply refuses it
        config.validate(device=device, layers=layers, model=args.model, ring=ring > 1, text_tokens=text_tokens)
    check_bench_outputs(args)
    rank, world = _init_distributed(args.gpus, device)
    frames = args.frames or spec["frames"]
    height, width = spec["resolutions"][args.resolution]
    model = _build(spec, device)
    inputs = _inputs(spec, frames, height, width, device)
    # Pipeline stand-ins: sparsevid reads the step index from the scheduler as inside a pipeline (no
    # device read). Forward rows: a generation mid-way (step 5 of 50, every step sparse); the loop: its
    # own scheduler, stepped as a pipeline steps it.
    mid_generation = types.SimpleNamespace(step_index=5, timesteps=torch.linspace(999, 0, 50))
    forward_target = types.SimpleNamespace(transformer=model, scheduler=mid_generation)
    schedule = types.SimpleNamespace(timesteps=None)
    target = types.SimpleNamespace(transformer=model, scheduler=schedule)

    from torch.nn.attention import SDPBackend, sdpa_kernel

    def timed(fn):
        return time_ms(fn, reps=args.reps, warmup=1, device=device)

    rows = []
    single_ms = None
    ulysses = world // ring
    parallel = "" if world == 1 else ", " + " x ".join(
        [f"Ulysses x{ulysses}"] * (ulysses > 1) + [f"ring x{ring}"] * (ring > 1))
    if world > 1:
        from diffusers import ContextParallelConfig

        single_ms = timed(lambda: _forward(model, inputs))  # every rank alone on its own GPU
        rows.append(dict(method="native, 1 GPU (no parallelism)", density=1.0, forward_ms=single_ms))
        if ring > 1 and device == "cuda":  # diffusers' ring template merges by log-sum-exp: default SDPA has none
            model.set_attention_backend("_native_cudnn")
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=ulysses, ring_degree=ring))
    if ring > 1 and device != "cuda":  # no CPU attention backend of diffusers returns the log-sum-exp
        native_ms = cudnn_ms = float("inf")
        print("[e2e] native ring attention needs a CUDA backend returning log-sum-exp: no native row on the CPU")
    elif ring > 1:
        native_ms = cudnn_ms = timed(lambda: _forward(model, inputs))
        rows.append(dict(method=f"native (diffusers ring template, cuDNN SDPA){parallel}", density=1.0,
                         forward_ms=native_ms))
    else:
        native_ms = timed(lambda: _forward(model, inputs))
        if device == "cuda":
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                cudnn_ms = timed(lambda: _forward(model, inputs))
        else:
            cudnn_ms = float("inf")
        rows.append(dict(method=f"native (default SDPA){parallel}", density=1.0, forward_ms=native_ms))
        if device == "cuda":
            rows.append(dict(method=f"native (cuDNN SDPA){parallel}", density=1.0, forward_ms=cudnn_ms))
    best_native = min(native_ms, cudnn_ms)
    if best_native == float("inf"):  # the CPU ring smoke run: speedups against one process
        best_native = single_ms
    timings = (("native", native_ms), ("cuDNN", cudnn_ms), ("1 GPU", single_ms))  # inf, None: not run
    print(f"[e2e] {args.model} {args.resolution} {frames} frames: "
          + ", ".join(f"{name} {ms:.1f} ms" for name, ms in timings if ms not in (None, float("inf"))))

    best_context = contextlib.nullcontext if native_ms <= cudnn_ms else lambda: sdpa_kernel([SDPBackend.CUDNN_ATTENTION])
    profiles = []
    if args.profile and device == "cuda":
        profiles.append(_profile(model, inputs, best_context, "native", args.out))
    loop_native = None
    if args.steps:
        with best_context():
            loop_native = _loop(model, inputs, args.steps, schedule, device, "native loop")

    from ...reuse import TokenReplay

    forward_reuse = [r for r in reuse if isinstance(r, TokenReplay)]  # step caches act only across steps
    reuse_names = " + ".join(reuse_label(r) for r in reuse)
    for (method, (kind, amount), backend, order, tail, balance), config in tqdm(
            list(zip(jobs, configs)), desc="sparse configs", unit="cfg"):
        sparse_method = config.method
        density = amount if kind == "density" else None
        budget = f"{amount:g}" if kind == "density" else f"mass={amount:g}"
        settings = config.apply_options()
        # forward: every step sparse (dense_steps=0); planning included in the time
        handle = sv.apply(forward_target, reuse=forward_reuse or None, **{**settings, "dense_steps": 0})
        with best_context():  # (the order head balance asks for applies where a layer next plans: a later forward)
            out, timing = time_sparse_forward(model, inputs, mid_generation, handle, args.replan_every, args.reps,
                                              device, f"{method}@{budget}")
        mid_generation.step_index = 5
        stats = handle.stats()
        tiled = bool(handle.sessions[0].tiled)
        if args.profile and sparse_method and device == "cuda":  # as the native profile: CUDA only
            profiles.append(_profile(model, inputs, best_context, f"{method}@{budget} {backend} "
                                     f"tile order {'on' if tiled else 'off'}" + (f" tail={tail}" if tail else ""),
                                     args.out))  # the tail in the name: one profile file per setting
        handle.remove()
        label = method + (f" [{backend}, tile order {'on' if tiled else 'off'}]" if sparse_method and len(variants) > 1
                          else "") + (f" tail={tail}" if tail else "") + (" head_balance" if balance else "")
        row = dict(method=label + (f" + {reuse_names}" if reuse_names else "") + parallel, density=density,
                   budget=budget, **timing, achieved=stats["mean_density"], finite=bool(torch.isfinite(out).all()),
                   sparse_calls=stats["sparse_calls"])
        if forward_reuse:
            row["forward_replay_rate"] = stats["reuse"][0]["token_replay"]["replay_rate"]
        if args.steps:
            handle = sv.apply(target, reuse=reuse or None, **settings)
            with best_context():
                row["loop_s"] = _loop(model, inputs, args.steps, schedule, device, f"{method} {budget} loop")
            handle.remove()
        rows.append(row)

    if rank != 0:
        return 0
    for r in rows:
        r["speedup"] = best_native / r["forward_ms"]
        if args.steps and "loop_s" in r:
            r["loop_speedup"] = loop_native / r["loop_s"]
    tokens = ((frames - 1) // 4 + 1) * (height // 16) * (width // 16)
    header = (
        f"{environment()}; {args.model} {args.resolution} ({height}x{width}, {frames} frames, {tokens} video tokens), "
        f"{'bf16' if device == 'cuda' else 'fp32 (CPU smoke run, not a benchmark)'}, random weights, batch 1; "
        f"forward: median of {args.reps} (after warm-up), "
        + ("each forward a step after the last, planning included (every forward plans, warm-started where the "
           "planner keeps centroids)" if args.replan_every == 1 else
           f"replanning every {args.replan_every} steps: the planning forward and {args.replan_every - 1} reusing "
           f"forwards, amortised (plan and reuse times in the JSON); the loop replans every {args.replan_every} steps")
        + f", first {args.dense_layers} block(s) dense"
        + (f", planner options {options}" if options else "")
        + (f"; reuse {reuse_names} (token replay in forward and loop, step caches in the loop only)" if reuse else "")
        + (f"; loop: {args.steps} steps x 2 guidance branches, default warm-up (first 20% of steps dense), "
           f"native loop {loop_native:.1f} s" if args.steps else "")
        + (f"; {world} ranks, Ulysses degree {ulysses}, ring degree {ring}: speedups are against the faster native "
           f"run under the same parallelism; native scaling efficiency {single_ms / (world * best_native):.0%} "
           f"(1-GPU time / ({world} x parallel time))" if world > 1 else "")
    )
    columns = ["method", "density", "achieved", "forward ms", "speedup vs best native"] + (
        ["vs 1-GPU native"] if world > 1 else []) + (["FFN rows replayed"] if reuse and any(
            isinstance(r, TokenReplay) for r in reuse) else []) + (["loop s", "loop speedup"] if args.steps else [])
    table_rows = []
    for r in rows:
        budget = r["budget"] if "budget" in r else f"{r['density']:g}"
        row = [r["method"], budget, f"{r['achieved']:.3f}" if r.get("achieved") else "-",
               f"{r['forward_ms']:.1f}", f"{r['speedup']:.2f}x"]
        if world > 1:
            row.append(f"{single_ms / r['forward_ms']:.2f}x")
        if "FFN rows replayed" in columns:
            row.append(f"{r['forward_replay_rate']:.3f}" if r.get("forward_replay_rate") is not None else "-")
        if args.steps:
            row += [f"{r['loop_s']:.1f}" if "loop_s" in r else "-",
                    f"{r['loop_speedup']:.2f}x" if "loop_speedup" in r else "-"]
        table_rows.append(row)
    table = markdown_table(columns, table_rows)
    if profiles:
        table += "\n\n" + markdown_table(
            ["profiled forward", "wall ms", "GPU kernel ms", "GPU idle ms", "host syncs", "kernels launched"],
            [[p["name"], f"{p['wall_ms']:.1f}", f"{p['gpu_ms']:.1f}", f"{p['wall_ms'] - p['gpu_ms']:.1f}",
              str(p["syncs"]), str(p["kernels"])] for p in profiles])
    print(header)
    print(table)
    with open(os.path.join(args.out, f"e2e_{args.model}_{args.resolution}.json"), "w") as f:
        json.dump(dict(header=header, rows=rows, gpus=world, ulysses=ulysses, ring=ring), f, indent=1)
    if args.record:
        append_benchmarks(args.benchmarks_md, f"bench e2e — {args.model} {args.resolution}", header, table)
    return 0 if all(r.get("finite", True) for r in rows) else 1
