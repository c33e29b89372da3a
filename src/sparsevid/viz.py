"""PNG pictures people would rather look at than read: draft maps, kept-block masks, frames."""

from __future__ import annotations

from pathlib import Path

import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, title: str | None = None, dpi: int = 110) -> Path:
    """Title (if any), tight layout, write ``path``, close ``fig``."""
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    _pyplot().close(fig)
    return Path(path)


def save_draft_map(probs: torch.Tensor, path: str | Path, title: str = "draft attention map") -> Path:
    """Heat map (log scale) of one head's draft map ``(NB, NB)``: query tiles down, key tiles across."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 5.4))
    image = ax.imshow(probs.float().clamp_min(1e-6).log10().cpu(), cmap="magma", interpolation="nearest")
    ax.set(title=title, xlabel="key tile", ylabel="query tile")
    fig.colorbar(image, ax=ax, label="log10 probability")
    return save_figure(fig, path)


def save_block_masks(masks: dict[str, torch.Tensor], path: str | Path, columns: int = 4) -> Path:
    """Grid of kept-block masks ``(NB, NB)`` (white = computed), one panel per title."""
    plt = _pyplot()
    rows = (len(masks) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (title, mask) in zip(axes.flat, masks.items()):
        ax.imshow(mask.cpu(), cmap="gray", interpolation="nearest", vmin=0, vmax=1)
        ax.set_title(title, fontsize=9)
    return save_figure(fig, path)


def save_frames(frames: torch.Tensor, path: str | Path, tile_px: tuple[int, int] | None = None, count: int = 4) -> Path:
    """A row of frames ``(N, 3, H, W)`` in [0, 1]; optionally the tile grid drawn over them."""
    plt = _pyplot()
    picks = torch.linspace(0, frames.shape[0] - 1, min(count, frames.shape[0])).round().long()
    fig, axes = plt.subplots(1, len(picks), figsize=(3.2 * len(picks), 2.2), squeeze=False)
    for ax, i in zip(axes[0], picks.tolist()):
        ax.imshow(frames[i].permute(1, 2, 0).clamp(0, 1).cpu())
        if tile_px is not None:
            h, w = frames.shape[-2:]
            for y in range(0, h, tile_px[0]):
                ax.axhline(y - 0.5, color="yellow", lw=0.6)
            for x in range(0, w, tile_px[1]):
                ax.axvline(x - 0.5, color="yellow", lw=0.6)
        ax.set_title(f"frame {i}", fontsize=9)
        ax.axis("off")
    return save_figure(fig, path)


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


def save_video_rows(videos: dict[str, torch.Tensor], path: str | Path, count: int = 6, title: str | None = None) -> Path:
    """One row per video ``(N, 3, H, W)`` (its key on the left), ``count`` evenly spaced frames each."""
    plt = _pyplot()
    rows = len(videos)
    fig, axes = plt.subplots(rows, count, figsize=(1.5 * count + 1.4, 1.5 * rows + (0.4 if title else 0)), squeeze=False)
    for r, (name, video) in enumerate(videos.items()):
        picks = torch.linspace(0, video.shape[0] - 1, min(count, video.shape[0])).round().long().tolist()
        for c, ax in enumerate(axes[r]):
            ax.set_xticks([]), ax.set_yticks([])
            if c >= len(picks):
                ax.axis("off")
            if c < len(picks):
                ax.imshow(video[picks[c]].permute(1, 2, 0).clamp(0, 1).cpu().numpy())
                if r == 0:
                    ax.set_title(f"frame {picks[c]}", fontsize=8)
            if c == 0:
                ax.set_ylabel(name, fontsize=8, rotation=0, ha="right", va="center")
    return save_figure(fig, path, title)


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
