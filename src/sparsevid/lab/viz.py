"""PNG pictures people would rather look at than read: block-level attention maps, kept-block masks, frames;
each demo figure carries a caption saying what to look at."""

from __future__ import annotations

import math
from pathlib import Path

import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, title: str | None = None, dpi: int = 110, caption: str | None = None) -> Path:
    """Title (if any), tight layout, ``caption`` (if any: what to look at) wrapped under the axes, write
    ``path``, close ``fig``."""
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    if caption:
        import textwrap

        width = max(60, int(fig.get_figwidth() * 15))  # characters per line at fontsize 8
        text = "\n".join(textwrap.fill(part, width) for part in caption.split("\n"))
        fig.text(0.01, 0.0, text, ha="left", va="top", fontsize=8, transform=fig.transFigure)
    fig.savefig(path, dpi=dpi, bbox_inches="tight" if caption else None)
    _pyplot().close(fig)
    return Path(path)


def save_block_maps(maps: dict[str, torch.Tensor], path: str | Path, columns: int = 2, title: str | None = None,
                    caption: str | None = None, floor: float = 1e-4) -> Path:
    """Heat maps (log scale, one colour scale for all) of attention maps at block resolution ``(NB, NB)``:
    query blocks down, key blocks across; each row of a map sums to 1. One panel per title."""
    plt = _pyplot()
    rows = (len(maps) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(3.6 * columns + 0.8, 3.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (name, m) in zip(axes.flat, maps.items()):
        ax.axis("on")
        image = ax.imshow(m.float().clamp_min(floor).log10().cpu().numpy(), cmap="magma", vmin=math.log10(floor), vmax=0,
                          interpolation="nearest")
        ax.set_title(name, fontsize=8)
        ax.set_xlabel(f"key block (of {m.shape[-1]})", fontsize=8)
        ax.set_ylabel("query block", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.colorbar(image, ax=ax, label="log10 mass", fraction=0.046, pad=0.04)
    return save_figure(fig, path, title, caption=caption)


def save_block_masks(masks: dict[str, torch.Tensor], path: str | Path, columns: int = 4, title: str | None = None,
                     caption: str | None = None) -> Path:
    """Grid of kept-block masks ``(NB, NB)``, one panel per title: white = computed. A value in (0, 1) is
    the fraction of that key block's tokens computed (a token plan drawn at block resolution, so its
    panel is square like the others instead of an ``NB x L`` strip)."""
    plt = _pyplot()
    rows = (len(masks) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 3.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (name, mask) in zip(axes.flat, masks.items()):
        # nearest keeps block edges sharp; past ~256 blocks a panel has fewer pixels than blocks: filter instead
        ax.imshow(mask.float().cpu().numpy(), cmap="gray", vmin=0, vmax=1,
                  interpolation="nearest" if mask.shape[-1] <= 256 else "antialiased")
        ax.set_title(name, fontsize=8)
    return save_figure(fig, path, title, caption=caption)


def save_frames(frames: torch.Tensor, path: str | Path, tile_px: tuple[int, int] | None = None, count: int = 4,
                title: str | None = None, caption: str | None = None) -> Path:
    """A row of frames ``(N, 3, H, W)`` in [0, 1]; optionally the tile grid drawn over them."""
    plt = _pyplot()
    picks = torch.linspace(0, frames.shape[0] - 1, min(count, frames.shape[0])).round().long()
    fig, axes = plt.subplots(1, len(picks), figsize=(2.4 * len(picks), 2.6), squeeze=False)
    for ax, i in zip(axes[0], picks.tolist()):
        ax.imshow(frames[i].permute(1, 2, 0).clamp(0, 1).cpu().numpy(), interpolation="nearest")
        if tile_px is not None:
            h, w = frames.shape[-2:]
            for y in range(0, h + 1, tile_px[0]):
                ax.axhline(y - 0.5, color="yellow", lw=0.8)
            for x in range(0, w + 1, tile_px[1]):
                ax.axvline(x - 0.5, color="yellow", lw=0.8)
        ax.set_title(f"frame {i}", fontsize=9)
        ax.axis("off")
    return save_figure(fig, path, title, caption=caption)


# ------------------------------------------------------------------------------------------------
# eval: side-by-side videos, frame grids, quality-vs-density curves
# ------------------------------------------------------------------------------------------------
def side_by_side(videos: dict[str, torch.Tensor], scale: int = 2, title_px: int = 14) -> torch.Tensor:
    """uint8 ``(N, H', W', 3)`` frames: the ``(N, 3, H, W)`` videos in [0, 1] next to each other, titled.

    Each video is upscaled ``scale`` times (nearest, so pixels stay visible) and gets its key as a
    title strip above it; a 2-px white gap separates columns.
    """
    from PIL import Image, ImageDraw

    n = min(v.shape[0] for v in videos.values())
    h, w = (s * scale for s in next(iter(videos.values())).shape[-2:])
    gap = 2
    width = len(videos) * (w + gap) - gap
    header = Image.new("RGB", (width, title_px), (255, 255, 255))
    draw = ImageDraw.Draw(header)
    for i, title in enumerate(videos):
        draw.text((i * (w + gap) + 2, 1), title[: max(4, w // 6)], fill=(0, 0, 0))
    out = torch.full((n, title_px + h, width, 3), 255, dtype=torch.uint8)
    out[:, :title_px] = torch.from_numpy(__import__("numpy").array(header))
    for i, video in enumerate(videos.values()):
        frames = video[:n].clamp(0, 1).mul(255).round().to(torch.uint8)
        frames = frames.repeat_interleave(scale, -2).repeat_interleave(scale, -1).permute(0, 2, 3, 1)
        out[:, title_px:, i * (w + gap) : i * (w + gap) + w] = frames
    return out


def mp4_writer() -> str | None:
    """The module that writes ``.mp4`` here: ``"av"`` (PyAV, H.264), else ``"cv2"`` (OpenCV, MPEG-4 part 2), else
    ``None`` (PyAV is a declared dependency, yet some images lack it)."""
    import importlib.util

    return next((m for m in ("av", "cv2") if importlib.util.find_spec(m) is not None), None)


def write_video(frames: torch.Tensor, path: str | Path, fps: int = 8) -> Path:
    """Write uint8 ``(N, H, W, 3)`` frames: ``.mp4`` (:func:`mp4_writer`; sizes padded to even) or ``.gif`` (Pillow).

    Raises:
        ModuleNotFoundError: an ``.mp4`` with neither PyAV nor OpenCV installed (check :func:`mp4_writer` first).
    """
    path = Path(path)
    if path.suffix.lower() == ".gif":
        from PIL import Image

        images = [Image.fromarray(f.numpy()) for f in frames]
        images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
        return path
    writer = mp4_writer()
    if writer is None:
        raise ModuleNotFoundError(f"Expect PyAV (pip install av) or OpenCV (pip install opencv-python-headless) to "
                                  f"write {path} but neither is installed; or write a .gif")
    n, h, w, _ = frames.shape
    frames = torch.nn.functional.pad(frames, (0, 0, 0, w % 2, 0, h % 2), value=255)  # yuv420p: even sizes
    if writer == "cv2":
        import cv2

        video = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (frames.shape[2], frames.shape[1]))
        for f in frames:
            video.write(f.numpy()[..., ::-1].copy())  # OpenCV takes BGR
        video.release()
        return path
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "12"}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f.numpy(), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def save_video_rows(videos: dict[str, torch.Tensor], path: str | Path, count: int = 6, title: str | None = None,
                    caption: str | None = None) -> Path:
    """One row per video ``(N, 3, H, W)`` (its key on the left), ``count`` evenly spaced frames each."""
    plt = _pyplot()
    rows = len(videos)
    count = min(count, min(v.shape[0] for v in videos.values()))  # no empty columns for short videos
    fig, axes = plt.subplots(rows, count, figsize=(1.5 * count + 1.4, 1.5 * rows + (0.4 if title else 0)), squeeze=False)
    for r, (name, video) in enumerate(videos.items()):
        picks = torch.linspace(0, video.shape[0] - 1, count).round().long().tolist()
        for c, ax in enumerate(axes[r]):
            ax.set_xticks([]), ax.set_yticks([])
            ax.imshow(video[picks[c]].permute(1, 2, 0).clamp(0, 1).cpu().numpy())
            if r == 0:
                ax.set_title(f"frame {picks[c]}", fontsize=8)
            if c == 0:
                ax.set_ylabel(name, fontsize=8, rotation=0, ha="right", va="center")
    return save_figure(fig, path, title, caption=caption)


def save_quality_curves(curves: dict[str, list[tuple[float, float, float]]], path: str | Path, title: str = "") -> Path:
    """PSNR and SSIM vs achieved density: ``curves[name] = [(density, psnr, ssim), ...]``, one line each."""
    plt = _pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, points in curves.items():
        points = sorted(points)
        xs = [p[0] for p in points]
        a.plot(xs, [p[1] for p in points], marker="o", label=name)
        b.plot(xs, [p[2] for p in points], marker="o", label=name)
    a.set(xlabel="achieved density", ylabel="PSNR vs dense (dB)", xscale="log")
    b.set(xlabel="achieved density", ylabel="SSIM vs dense", xscale="log")
    for ax in (a, b):
        ax.grid(alpha=0.3, which="both")
    a.legend(fontsize=8)
    return save_figure(fig, path, title)
