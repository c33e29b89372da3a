"""What testbed-l is judged by after each chunk of training, on fixed held-out cases (issue 34).

``python -m sparsevid.lab.testbed.train --testbed large --stats-cases N`` ends a chunk by generating the
first ``N`` held-out cases (:func:`~.motion.held_out_cases`: the motions ``eval --held-out`` generates,
never drawn in training) with the EMA weights it just saved, and records :func:`held_out_stats` in the
chunk's JSON (``held_out``; a resumed run carries it into ``chunks``):

- ``block_mass``: the mean over layers x heads (and cases) of ``block@0.1`` of :mod:`sparsevid.lab.stats`,
  the mass the best 10% of key blocks keep; the issue's target is >= 0.70.
- ``neighbourhood``: the mean mass on the query tile's neighbourhood (its tile and the tiles around it,
  in its frame and the frames before and after), ``near_frames`` the mean mass within ±1 frame.
- ``uniform_heads`` of ``heads`` (layers x heads): the heads whose row entropy, averaged over the cases,
  is >= 0.9 of ``log L`` (target: fewer than a quarter).
- ``frame_difference``, ``reference_frame_difference`` and ``motion_ratio``: the static-video guard below.

Attention is captured at the step ``eval --stats`` captures (:func:`sparsevid.lab.eval.default_capture_step`).

**Static-video guard**: attention gets concentrated for free if the model learns to generate still video
(every frame attends to its own copy). :func:`motion_ratio` is the samples' mean frame-to-frame difference
over that of the reference clips (each case's motion rendered from its real clip at the same view and
size); it must stay within :data:`MOTION_TOLERANCE` of 1.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .motion import render

__all__ = ["MOTION_TOLERANCE", "UNIFORM_ENTROPY", "frame_difference", "motion_ratio", "reference_clip", "held_out_stats"]

MOTION_TOLERANCE = 0.1
"""The guard: ``|motion_ratio - 1| <= MOTION_TOLERANCE``."""

UNIFORM_ENTROPY = 0.9
"""A head counts as nearly uniform when its mean row entropy is at least this share of ``log L``."""

_FRACTION = 0.1  # the block oracle's budget the target is stated at


def _check_video(name: str, video) -> torch.Tensor:
    if not isinstance(video, torch.Tensor) or video.dim() != 4 or video.shape[1] != 3 or video.shape[0] < 2:
        raise ValueError(f"Expect {name} to be an (F >= 2, 3, H, W) video but got {getattr(video, 'shape', type(video))}")
    return video


def frame_difference(video: torch.Tensor) -> float:
    """Mean absolute difference between consecutive frames of an ``(F, 3, H, W)`` video (F >= 2)."""
    return float(_check_video("video", video).float().diff(dim=0).abs().mean())


def motion_ratio(samples, references) -> float:
    """Mean :func:`frame_difference` of ``samples`` over that of ``references`` (sequences of
    ``(F, 3, H, W)`` videos in [0, 1], pairwise of one shape): 1 when the samples move as much as their
    reference clips, near 0 for still video. The guard holds when it is within :data:`MOTION_TOLERANCE` of 1."""
    samples, references = list(samples), list(references)
    if not samples or len(samples) != len(references):
        raise ValueError(f"Expect as many references as samples (at least one) but got {len(samples)} and {len(references)}")
    for i, (s, r) in enumerate(zip(samples, references)):
        if _check_video(f"samples[{i}]", s).shape != _check_video(f"references[{i}]", r).shape:
            raise ValueError(f"Expect references[{i}] of the shape of samples[{i}] {tuple(s.shape)} but got {tuple(r.shape)}")
    reference = sum(map(frame_difference, references)) / len(references)
    if reference <= 0:
        raise ValueError("Expect references that move (a frame-to-frame difference > 0) but got still clips")
    return sum(map(frame_difference, samples)) / len(samples) / reference


def reference_clip(clips: list[torch.Tensor], case: dict, frames: int, size: int, native: int) -> torch.Tensor:
    """What the held-out ``case`` asks for, cut from its real clip: ``case["motion"]`` rendered from
    ``clips[case["label"]]`` (uint8 ``(N, 3, h, w)`` in :data:`~.model.LABELS` order, as the trainer loads
    them) from the middle of the clip, ``frames`` frames of ``size`` px showing the view of ``native`` px.

    Returns:
        float32 ``(frames, 3, size, size)`` in [0, 1] on the CPU.
    """
    from .model import LABELS

    motion = case["motion"]
    clip = clips[LABELS.index(case["label"])]
    start = (clip.shape[0] - (frames - 1) * motion.speed - 1) // 2
    sprite = clips[motion.sprite] if motion.sprite >= 0 else None
    video = render(clip, motion, frames, size, native=native, start=start, sprite_clip=sprite)
    return video.permute(1, 0, 2, 3).add(1).div(2).cpu()


@torch.no_grad()
def held_out_stats(pipe, clips: list[torch.Tensor], cases: list[dict], steps: int = 20, frames: int | None = None,
                   size: int | None = None, native: int | None = None, progress: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
    """Generate every held-out case with ``pipe`` (a testbed-l :class:`~.pipeline.TestbedPipeline`), capture
    its attention, and measure what the module docstring lists.

    Args:
        pipe: the pipeline of the weights to judge.
        clips: the real clips, as :func:`reference_clip` takes them.
        cases: held-out cases (:func:`~.motion.held_out_cases`).
        steps: sampler steps; ``frames``/``size``: the sample size (default: the testbed's native).
        native: the side whose view a sample shows (:func:`~.motion.render`; default the testbed's native
            size; the trainer passes its ``--size``, the view it trained on).

    Returns:
        ``(stats, videos)``: ``stats`` the JSON-ready dict (floats rounded to 4 digits), ``videos`` each
        case's sample and reference clip, ``(F, 3, S, S)`` in [0, 1], keyed by a row title in case order.
    """
    from .. import stats
    from ..eval import LayerCapture, case_name, default_capture_step

    if not cases:
        raise ValueError("Expect at least one held-out case but got none")
    frames = frames or pipe.spec.sample["frames"]
    size = size or pipe.spec.sample["height"]
    native = native or pipe.spec.sample["height"]
    step = default_capture_step(steps)
    rows, samples, references, videos = [], [], [], {}
    for i, case in enumerate(tqdm(cases, desc="held-out stats", unit="case", disable=not progress)):
        capture = LayerCapture(pipe.transformer, step)
        try:
            sample = pipe(label=case["label"], seed=case["seed"], motion=case["motion"], steps=steps, frames=frames,
                          height=size, width=size, progress=False)
        finally:
            capture.remove()
        rows += stats.layer_stats(capture.layers, capture.grid, capture.text_first, fractions=(_FRACTION,))
        reference = reference_clip(clips, case, frames, size, native)
        samples.append(sample)
        references.append(reference)
        videos[f"{i}: {case_name(case)}"] = sample
        videos[f"{i}: reference"] = reference
    summary = stats.summarize_stats(rows)
    heads, overall = [r for r in summary if r["head"] != "mean"], summary[-1]
    moved, moved_ref = (sum(map(frame_difference, v)) / len(v) for v in (samples, references))
    record = dict(
        cases=len(cases), steps=steps, capture_step=step, frames=frames, size=size,
        block_mass=overall[f"block@{_FRACTION:g}"], neighbourhood=overall["neighbourhood"],
        near_frames=overall["near_frames"], entropy=overall["entropy"],
        uniform_heads=sum(r["entropy"] >= UNIFORM_ENTROPY for r in heads), heads=len(heads),
        frame_difference=moved, reference_frame_difference=moved_ref, motion_ratio=motion_ratio(samples, references),
    )
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()}, videos
