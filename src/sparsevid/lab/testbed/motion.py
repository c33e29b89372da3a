"""Procedural motion for testbed-l: pans, zooms, playback speed and direction, and a moving sprite.

A :class:`Motion` says how a clip of ``F`` frames is cut from a real source clip, and it is also
part of testbed-l's condition (:meth:`Motion.vector`): the model has to produce content that moves
as asked, so it must track content across frames -- what makes the attention of real video DiTs
local in space and time. Nothing here looks at attention; data and size are meant to do it.

Geometry (source pixels; ``S`` = output side at the native size, ``c = zoom * S`` = crop side):

- the crop centre moves linearly by ``pan * c`` over the clip (``pan`` per axis, in crop sides);
  ``cx``/``cy`` in [0, 1] place its start along the range that keeps the whole path inside the
  frame, so every value is valid for every clip;
- output frame ``t`` shows source frame ``start + t * speed`` (``reverse``: the frames backwards);
- a sprite (the centre of another clip, side ``S / 4``, playing in step) crosses the output by
  ``sprite_vx``/``sprite_vy`` output sides over the clip, its start placed like the crop's.

Rendering at a lower resolution than the native one shows the same view (the same crop of the
source), which is what lets training start at low resolution with the same conditions.

**Held out**: reversed playback at speed 2 with a crop starting in the right part of the frame
(``cx > 0.6``). Training never draws it; the fidelity frontier (issue 14) generates only such cases.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

__all__ = ["MOTION_DIMS", "Motion", "held_out_cases", "render"]

MOTION_DIMS = 13
"""Length of :meth:`Motion.vector`."""

_ZOOM = (1.0, 1.4)
_PAN = 0.3  # |pan| <= 0.3 crop sides over the clip
_SPRITE_SPEED = 0.5  # |sprite_v| <= half the output side over the clip


@dataclass(frozen=True)
class Motion:
    """How a clip is cut from its source; defaults = a still, centred, forward crop, no sprite."""

    cx: float = 0.5
    cy: float = 0.5
    zoom: float = 1.0
    pan_x: float = 0.0
    pan_y: float = 0.0
    speed: int = 1
    reverse: bool = False
    sprite: int = -1  # label index of the sprite's source clip; -1: no sprite
    sprite_x: float = 0.5
    sprite_y: float = 0.5
    sprite_vx: float = 0.0
    sprite_vy: float = 0.0

    def check(self, num_labels: int) -> "Motion":
        for name in ("cx", "cy", "sprite_x", "sprite_y"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"Expect motion.{name} in [0, 1] but got {getattr(self, name)!r}")
        if not _ZOOM[0] <= self.zoom <= _ZOOM[1]:
            raise ValueError(f"Expect motion.zoom in {list(_ZOOM)} but got {self.zoom!r}")
        for name, bound in (("pan_x", _PAN), ("pan_y", _PAN), ("sprite_vx", _SPRITE_SPEED), ("sprite_vy", _SPRITE_SPEED)):
            if abs(getattr(self, name)) > bound:
                raise ValueError(f"Expect |motion.{name}| <= {bound} but got {getattr(self, name)!r}")
        if self.speed not in (1, 2, 3):
            raise ValueError(f"Expect motion.speed in (1, 2, 3) but got {self.speed!r}")
        if not -1 <= self.sprite < num_labels:
            raise ValueError(f"Expect motion.sprite in [-1, {num_labels}) but got {self.sprite!r}")
        return self

    @property
    def held_out(self) -> bool:
        return self.reverse and self.speed == 2 and self.cx > 0.6

    def vector(self, num_labels: int) -> torch.Tensor:
        """The condition: ``(MOTION_DIMS,)`` float32, every entry roughly in [-1, 1]."""
        on = self.sprite >= 0
        sprite_id = 2 * self.sprite / max(1, num_labels - 1) - 1 if on else 0.0
        return torch.tensor([
            2 * self.cx - 1, 2 * self.cy - 1, 2 * (self.zoom - _ZOOM[0]) / (_ZOOM[1] - _ZOOM[0]) - 1,
            self.pan_x / _PAN, self.pan_y / _PAN, self.speed - 2.0, 1.0 if self.reverse else -1.0,
            1.0 if on else -1.0, sprite_id,
            (2 * self.sprite_x - 1) if on else 0.0, (2 * self.sprite_y - 1) if on else 0.0,
            self.sprite_vx / _SPRITE_SPEED if on else 0.0, self.sprite_vy / _SPRITE_SPEED if on else 0.0,
        ], dtype=torch.float32)

    @staticmethod
    def random(g: torch.Generator, num_labels: int, held_out: bool = False) -> "Motion":
        """A training draw (never held out), or with ``held_out=True`` a held-out one."""

        def u(lo=0.0, hi=1.0):
            return lo + (hi - lo) * float(torch.rand((), generator=g))

        def pan(bound):
            return u(-bound, bound) if u() < 0.7 else 0.0

        m = Motion(
            cx=u(), cy=u(), zoom=u(*_ZOOM), pan_x=pan(_PAN), pan_y=pan(_PAN),
            speed=1 + int(torch.randint(3, (), generator=g)), reverse=u() < 0.3,
        )
        if u() < 0.4:
            m = replace(m, sprite=int(torch.randint(num_labels, (), generator=g)), sprite_x=u(), sprite_y=u(),
                        sprite_vx=pan(_SPRITE_SPEED), sprite_vy=pan(_SPRITE_SPEED))
        if held_out:
            return replace(m, reverse=True, speed=2, cx=u(0.62, 1.0))
        return m if not m.held_out else replace(m, cx=u(0.0, 0.6))


def held_out_cases(count: int, labels, num_labels: int, seeds=None) -> list[dict]:
    """The fixed held-out cases that ``eval --held-out`` and the trainer's after-chunk statistics generate:
    case ``i`` is ``dict(label, seed, motion)`` with label ``labels[i % len(labels)]``, seed ``i`` (or
    ``seeds`` cycled) and the held-out draw (sprites from ``num_labels`` clips) of a generator seeded
    ``1000 + i``, so the cases are the same in every run."""
    labels, seeds = list(labels), list(seeds or range(count))
    return [dict(label=labels[i % len(labels)], seed=seeds[i % len(seeds)],
                 motion=Motion.random(torch.Generator().manual_seed(1000 + i), num_labels, held_out=True))
            for i in range(count)]


def _start(fraction: float, extent: float, size: float, travel: float) -> float:
    """Start coordinate (of a window's low edge) so that a window of ``size`` moving by ``travel``
    stays in [0, extent]; ``fraction`` in [0, 1] places it along the feasible range."""
    lo, hi = max(0.0, -travel), extent - size - max(0.0, travel)
    if hi < lo:
        raise ValueError(f"Expect a source of at least {size + abs(travel):.0f} px along this axis but it has {extent}")
    return lo + fraction * (hi - lo)


def render(clip: torch.Tensor, motion: Motion, frames: int, size: int, native: int, start: int = 0,
           sprite_clip: torch.Tensor | None = None) -> torch.Tensor:
    """Cut ``frames`` frames of ``size`` x ``size`` px from ``clip`` as ``motion`` says.

    Args:
        clip: uint8 ``(N, 3, h, w)`` source (any device).
        frames, size: output length and side; ``native``: the side whose crop the view is
            (``size < native`` renders the same view at a lower resolution).
        start: first source frame (a time offset, not part of the condition).
        sprite_clip: uint8 ``(N', 3, h', w')``, required when ``motion.sprite >= 0``.

    Returns:
        float32 ``(3, frames, size, size)`` in [-1, 1] on ``clip``'s device.
    """
    n, _, h, w = clip.shape
    span = (frames - 1) * motion.speed + 1
    if start < 0 or start + span > n:
        raise ValueError(f"Expect start in [0, {n - span}] for {frames} frames at speed {motion.speed} but got {start}")
    index = start + torch.arange(frames, device=clip.device) * motion.speed
    if motion.reverse:
        index = index.flip(0)
    src = clip[index].float().div_(127.5).sub_(1)  # (F, 3, h, w)
    crop = motion.zoom * native
    pool = max(1, int(crop / size))  # cheap anti-aliasing for low-resolution views
    if pool > 1:
        src = F.avg_pool2d(src, pool, ceil_mode=True)
    t = torch.linspace(0, 1, frames, device=clip.device).view(-1, 1, 1)
    dx, dy = motion.pan_x * crop, motion.pan_y * crop
    x0 = _start(motion.cx, w, crop, dx) + dx * t  # (F, 1, 1) left edge in source px
    y0 = _start(motion.cy, h, crop, dy) + dy * t
    offsets = (torch.arange(size, device=clip.device) + 0.5) * (crop / size)
    gx = (x0 + offsets.view(1, 1, -1)) / w * 2 - 1  # (F, 1, S): align_corners=False coordinates
    gy = (y0 + offsets.view(1, -1, 1)) / h * 2 - 1  # (F, S, 1)
    grid = torch.stack(torch.broadcast_tensors(gx, gy), dim=-1)  # (F, S, S, 2)
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if motion.sprite >= 0:
        if sprite_clip is None:
            raise ValueError("Expect sprite_clip for a motion with a sprite")
        out = _paste_sprite(out, sprite_clip, motion, index, size)
    return out.clamp_(-1, 1).permute(1, 0, 2, 3).contiguous()


def _paste_sprite(out: torch.Tensor, sprite_clip: torch.Tensor, motion: Motion, index: torch.Tensor, size: int):
    n, _, h, w = sprite_clip.shape
    side = max(2, size // 4)
    half = min(h, w) // 4  # the centre square of half the short side
    cut = sprite_clip[index % n, :, h // 2 - half : h // 2 + half, w // 2 - half : w // 2 + half].float()
    patch = F.interpolate(cut.div_(127.5).sub_(1), size=(side, side), mode="area")  # (F, 3, side, side)
    frames = out.shape[0]
    dx, dy = motion.sprite_vx * size, motion.sprite_vy * size
    x0, y0 = _start(motion.sprite_x, size, side, dx), _start(motion.sprite_y, size, side, dy)
    for f in range(frames):
        s = f / max(1, frames - 1)
        x, y = round(x0 + dx * s), round(y0 + dy * s)
        out[f, :, y : y + side, x : x + side] = patch[f]
    return out
