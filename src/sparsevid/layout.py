"""Token layout of a video transformer's sequence and its tile permutation.

A video DiT flattens its latent grid frame by frame, row by row: token ``(f, y, x)`` sits at
``f * height * width + y * width + x`` (after the text tokens when they come first). Attention
mass concentrates between *spatially* close tokens, but in that order a 2-D patch of a frame is
scattered over ``tile_height`` separate runs. ``VideoLayout`` defines the *tile order*: every
``tile_height x tile_width`` tile of every frame becomes one contiguous block of ``block_size``
slots, its real tokens first (row-major inside the tile) and ``-1`` padding after them. Tiles at
the right and bottom edges of a grid the tile does not divide are ragged (fewer real tokens);
padding slots are never attended and never written. Text tokens fill blocks of their own.

Shape legend: ``F`` frames, ``H``/``W`` token grid height/width, ``T`` text tokens,
``L = F*H*W + T`` sequence length, ``NB`` blocks, ``S = NB * block_size`` slots.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import cached_property
from types import SimpleNamespace

import torch

__all__ = ["VideoLayout", "auto_tile"]


def auto_tile(height: int, width: int, block_size: int = 128) -> tuple[int, int]:
    """Tile ``(tile_height, tile_width)`` with at most ``block_size`` tokens for an ``height x width`` frame.

    Chooses the tile that needs the fewest tiles per frame (so the least padding, which the kernel
    computes for nothing), then the squarest (pooled draft tokens stay spatially compact), then
    the widest. For 32x32 this is 8x16; for Wan2.1 480p's 30x52 it is 30x4 (94% of slots real,
    where 8x16 would leave 24% of them padding).
    """
    best = None
    for th in range(1, min(height, block_size) + 1):
        tw = min(width, block_size // th)
        tiles = math.ceil(height / th) * math.ceil(width / tw)
        aspect = max(th / tw, tw / th)
        key = (tiles, aspect, -tw)
        if best is None or key < best[0]:
            best = (key, (th, tw))
    return best[1]


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"Expect {name} to be an int but got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"Expect {name} > 0 but got {name}={value}")
    return value


@dataclass(frozen=True)
class VideoLayout:
    """Where each token of a video transformer's sequence sits in the latent grid.

    Args:
        frames (int): latent frames ``F`` (after the temporal patch size).
        height (int): token rows per frame ``H`` (after patchify).
        width (int): token columns per frame ``W``.
        text_tokens (int): joint-attention text tokens ``T`` in the same sequence (0 for Wan).
        text_first (bool): text tokens precede the video tokens (CogVideoX) instead of following
            them (HunyuanVideo). Ignored when ``text_tokens == 0``.
        tile (tuple[int, int] | None): ``(tile_height, tile_width)`` of one block's spatial tile;
            ``None`` picks one with :func:`auto_tile`. ``tile_height * tile_width <= block_size``.
        block_size (int): slots per block, the kernel's query and key tile (a multiple of 16).

    Example::

        layout = VideoLayout(frames=21, height=30, width=52)   # Wan2.1-1.3B at 480p
        layout.num_tokens, layout.tile, layout.num_blocks      # 32760, (30, 4), 273
    """

    frames: int
    height: int
    width: int
    text_tokens: int = 0
    text_first: bool = False
    tile: tuple[int, int] | None = None
    block_size: int = 128
    _tiles_per_frame: tuple[int, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        for name in ("frames", "height", "width", "block_size"):
            _positive_int(name, getattr(self, name))
        if isinstance(self.text_tokens, bool) or not isinstance(self.text_tokens, int) or self.text_tokens < 0:
            raise ValueError(f"Expect text_tokens to be an int >= 0 but got {self.text_tokens!r}")
        if self.block_size % 16:
            raise ValueError(f"Expect block_size to be a multiple of 16 (tensor-core tile) but got {self.block_size}")
        tile = self.tile if self.tile is not None else auto_tile(self.height, self.width, self.block_size)
        if not (isinstance(tile, (tuple, list)) and len(tile) == 2):
            raise TypeError(f"Expect tile to be (tile_height, tile_width) but got {self.tile!r}")
        th, tw = (_positive_int("tile", int(t)) for t in tile)
        if th * tw > self.block_size:
            raise ValueError(
                f"Expect tile_height * tile_width <= block_size={self.block_size} but got tile={tile}; "
                "use a smaller tile or a larger block_size"
            )
        object.__setattr__(self, "tile", (min(th, self.height), min(tw, self.width)))
        object.__setattr__(
            self, "_tiles_per_frame", (math.ceil(self.height / self.tile[0]), math.ceil(self.width / self.tile[1]))
        )

    # ------------------------------------------------------------------ sizes
    @property
    def video_tokens(self) -> int:
        return self.frames * self.height * self.width

    @property
    def num_tokens(self) -> int:
        """``L``: the sequence length q, k and v must have."""
        return self.video_tokens + self.text_tokens

    @property
    def tiles_per_frame(self) -> tuple[int, int]:
        """``(tile rows, tile columns)`` of one frame."""
        return self._tiles_per_frame

    @property
    def num_video_blocks(self) -> int:
        return self.frames * self._tiles_per_frame[0] * self._tiles_per_frame[1]

    @property
    def num_text_blocks(self) -> int:
        return math.ceil(self.text_tokens / self.block_size)

    @property
    def num_blocks(self) -> int:
        """``NB``: query blocks = key blocks."""
        return self.num_video_blocks + self.num_text_blocks

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size

    def replace(self, **changes) -> "VideoLayout":
        """A copy with some fields changed (e.g. ``layout.replace(tile=(8, 16))``)."""
        return replace(self, **changes)

    # ------------------------------------------------------------------ permutation
    @cached_property
    def _tables(self) -> dict[str, torch.Tensor]:
        F, H, W, T, bs = self.frames, self.height, self.width, self.text_tokens, self.block_size
        th, tw = self.tile
        nty, ntx = self._tiles_per_frame
        video_offset = T if self.text_first else 0
        text_offset = 0 if self.text_first else F * H * W

        # Slot s of video block (f, ty, tx) holds in-tile position (s // tw_eff, s % tw_eff); the
        # effective tile is clipped at the grid edge, so real tokens come first in every block.
        ty = torch.arange(nty)
        tx = torch.arange(ntx)
        tile_h = (H - ty * th).clamp(max=th)  # (nty,)
        tile_w = (W - tx * tw).clamp(max=tw)  # (ntx,)
        s = torch.arange(bs)
        eff_w = tile_w.view(1, ntx, 1)
        eff_h = tile_h.view(nty, 1, 1)
        row = s.view(1, 1, bs) // eff_w
        col = s.view(1, 1, bs) % eff_w
        real = row < eff_h  # (nty, ntx, bs)
        y = ty.view(nty, 1, 1) * th + row
        x = tx.view(1, ntx, 1) * tw + col
        in_frame = torch.where(real, y * W + x, torch.full_like(y, -1))  # (nty, ntx, bs)
        f = torch.arange(F).view(F, 1, 1, 1)
        video = torch.where(in_frame >= 0, video_offset + f * H * W + in_frame, -1).reshape(-1, bs)

        t = torch.arange(self.num_text_blocks * bs)
        text = torch.where(t < T, text_offset + t, -1).reshape(-1, bs)
        blocks = torch.cat([text, video] if self.text_first else [video, text])
        perm = blocks.reshape(-1)

        inverse = torch.empty(self.num_tokens, dtype=torch.long)
        slots = torch.nonzero(perm >= 0).squeeze(1)
        inverse[perm[slots]] = slots

        grid = torch.stack(torch.meshgrid(torch.arange(F), ty, tx, indexing="ij"), -1).reshape(-1, 3)
        text_coords = torch.full((self.num_text_blocks, 3), -1, dtype=torch.long)
        coords = torch.cat([text_coords, grid] if self.text_first else [grid, text_coords])
        return {
            "perm": perm,
            "inverse_perm": inverse,
            "block_of_token": inverse // bs,
            "block_tokens": (blocks >= 0).sum(1),
            "block_coords": coords,
            "is_text_block": coords[:, 0] < 0,
        }

    def on(self, device) -> SimpleNamespace:
        """The layout's index tables on ``device``, copied once and cached.

        Attributes: ``perm``, ``inverse_perm``, ``block_of_token`` (int64 ``(L,)``: block of each
        token), ``block_tokens``, ``block_coords``, ``is_text_block`` — as the properties of the same
        names. Planners use this so that a plan on the GPU costs no host-to-device copy.
        """
        key = str(torch.device(device))
        cache = self.__dict__.setdefault("_device_tables", {})
        if key not in cache:
            cache[key] = SimpleNamespace(**{name: t.to(device) for name, t in self._tables.items()})
        return cache[key]

    @property
    def perm(self) -> torch.Tensor:
        """int64 ``(S,)``: original token index of each tile-order slot, ``-1`` for padding."""
        return self._tables["perm"]

    @property
    def inverse_perm(self) -> torch.Tensor:
        """int64 ``(L,)``: tile-order slot of each original token (``perm[inverse_perm] == arange(L)``)."""
        return self._tables["inverse_perm"]

    @property
    def block_tokens(self) -> torch.Tensor:
        """int64 ``(NB,)``: real (non-padding) tokens in each block."""
        return self._tables["block_tokens"]

    @property
    def block_coords(self) -> torch.Tensor:
        """int64 ``(NB, 3)``: ``(frame, tile row, tile column)`` of each video block, ``-1`` for text blocks."""
        return self._tables["block_coords"]

    @property
    def is_text_block(self) -> torch.Tensor:
        """bool ``(NB,)``."""
        return self._tables["is_text_block"]

    # ------------------------------------------------------------------ moving tensors
    def to_tiles(self, x: torch.Tensor, dim: int = -2) -> torch.Tensor:
        """Gather ``x`` (``L`` along ``dim``) into tile order (``S`` along ``dim``); padding slots are zero."""
        dim = dim % x.dim()
        if x.shape[dim] != self.num_tokens:
            raise ValueError(f"Expect size {self.num_tokens} (layout.num_tokens) along dim {dim} but got {x.shape[dim]}")
        perm = self.on(x.device).perm
        out = x.index_select(dim, perm.clamp(min=0))
        shape = [1] * x.dim()
        shape[dim] = -1
        return out.masked_fill((perm < 0).view(shape), 0)

    def from_tiles(self, x: torch.Tensor, dim: int = -2) -> torch.Tensor:
        """Inverse of :meth:`to_tiles`: ``S`` slots along ``dim`` back to ``L`` tokens in original order."""
        dim = dim % x.dim()
        if x.shape[dim] != self.num_slots:
            raise ValueError(f"Expect size {self.num_slots} (layout.num_slots) along dim {dim} but got {x.shape[dim]}")
        return x.index_select(dim, self.on(x.device).inverse_perm)

    def __str__(self) -> str:
        text = f", text_tokens={self.text_tokens} ({'first' if self.text_first else 'last'})" if self.text_tokens else ""
        return (
            f"VideoLayout({self.frames}x{self.height}x{self.width}{text}, L={self.num_tokens}, tile={self.tile}, "
            f"block_size={self.block_size}, blocks={self.num_blocks}, real slots {self.num_tokens / self.num_slots:.1%})"
        )
