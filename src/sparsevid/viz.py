"""PNG pictures people would rather look at than read: draft maps, kept-block masks, frames."""

from __future__ import annotations

from pathlib import Path

import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_draft_map(probs: torch.Tensor, path: str | Path, title: str = "draft attention map") -> Path:
    """Heat map (log scale) of one head's draft map ``(NB, NB)``: query tiles down, key tiles across."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 5.4))
    image = ax.imshow(probs.float().clamp_min(1e-6).log10().cpu(), cmap="magma", interpolation="nearest")
    ax.set(title=title, xlabel="key tile", ylabel="query tile")
    fig.colorbar(image, ax=ax, label="log10 probability")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
