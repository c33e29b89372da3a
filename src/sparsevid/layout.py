"""Token layout of a video transformer's sequence and its tile permutation.

A video DiT flattens its latent grid frame by frame, row by row: token ``(f, y, x)`` sits at
``f * height * width + y * width + x`` (after the text tokens when they come first). Attention
mass concentrates between *spatially* close tokens, but in that order a 2-D patch of a frame is
scattered over ``tile_height`` separate runs. ``VideoLayout`` defines the *tile order*: the
tokens of every ``tile_height x tile_width`` tile of every frame, row-major inside the tile, tile
after tile (frame, tile row, tile column), with the text tokens before or after them. Blocks are
consecutive runs of ``block_size`` slots of that order, so a block is one tile, or the end of one
tile and the start of the next (spatial neighbours). Nothing is padded inside the sequence: only
the last block may be short, and its missing slots (``-1``) are neither attended nor written.
A block holding any text token is a *text block* (attended densely in both directions).

Why no padding per tile: a grid the tile does not divide leaves ragged edge tiles; padding each
tile to a whole block made every kernel compute 6-12% padding entries at Wan's 480p/720p grids
(93.75% real slots), and a kernel that reads a contiguous tile-order sequence (FlashAttention-4)
cannot skip padding in the middle of it.

Shape legend: ``F`` frames, ``H``/``W`` token grid height/width, ``T`` text tokens,
``L = F*H*W + T`` sequence length, ``NB = ceil(L / block_size)`` blocks, ``S = NB * block_size`` slots.
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

    Chooses the tile that needs the fewest tiles per frame (tiles as close to a whole block as the
    frame allows, so a block covers one tile or parts of two neighbouring ones), then the squarest
    (pooled draft tokens stay spatially compact), then the widest. For 32x32 this is 8x16 (every
    block is one tile); for Wan2.1 480p's 30x52 it is 30x4 (13 strips of 120 tokens per frame).
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
        raise TypeError(f"Expect {name} to be an int but got {type(value).__name__} {value!r}")
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
        tile (tuple[int, int] | None): ``(tile_height, tile_width)`` of the spatial tiles that
            order the tokens; ``None`` picks one with :func:`auto_tile`. ``tile_height *
            tile_width <= block_size``.
        block_size (int): slots per block, the kernels' query and key tile (a multiple of 16).
        tiled (bool): the sequence itself is already in tile order (a model that keeps its tokens
            in tile order between layers): ``perm`` is then the identity, and nothing is gathered.

    Example::

        layout = VideoLayout(frames=21, height=30, width=52)   # Wan2.1-1.3B at 480p
        layout.num_tokens, layout.tile, layout.num_blocks      # 32760, (30, 4), 256
    """

    frames: int
    height: int
    width: int
    text_tokens: int = 0
    text_first: bool = False
    tile: tuple[int, int] | None = None
    block_size: int = 128
    tiled: bool = False
    # per-device copies of the index tables (:meth:`on`); a plain dict so torch.compile reads it
    _device_tables: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        for name in ("frames", "height", "width", "block_size"):
            _positive_int(name, getattr(self, name))
        if isinstance(self.text_tokens, bool) or not isinstance(self.text_tokens, int) or self.text_tokens < 0:
            raise ValueError(f"Expect text_tokens to be an int >= 0 but got {self.text_tokens!r}")
        for name in ("text_first", "tiled"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"Expect {name} to be a bool but got {type(getattr(self, name)).__name__}")
        if self.block_size % 16:
            raise ValueError(f"Expect block_size to be a multiple of 16 (tensor-core tile) but got {self.block_size}")
        tile = self.tile if self.tile is not None else auto_tile(self.height, self.width, self.block_size)
        if not (isinstance(tile, (tuple, list)) and len(tile) == 2):
            raise TypeError(f"Expect tile to be (tile_height, tile_width) but got {self.tile!r}")
        th, tw = (_positive_int("tile", t) for t in tile)
        if th * tw > self.block_size:
            raise ValueError(
                f"Expect tile_height * tile_width <= block_size={self.block_size} but got tile={tuple(tile)}; "
                "use a smaller tile or a larger block_size"
            )
        object.__setattr__(self, "tile", (min(th, self.height), min(tw, self.width)))

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
        return (math.ceil(self.height / self.tile[0]), math.ceil(self.width / self.tile[1]))

    @property
    def num_blocks(self) -> int:
        """``NB``: query blocks = key blocks."""
        return math.ceil(self.num_tokens / self.block_size)

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size

    def replace(self, **changes) -> "VideoLayout":
        """A copy with some fields changed (e.g. ``layout.replace(tile=(8, 16))``)."""
        return replace(self, **changes)

    # ------------------------------------------------------------------ permutation
    @cached_property
    def _tables(self) -> dict[str, torch.Tensor]:
        return self._build_tables()

    # Built eagerly even when first read inside a torch.compile region: they are cached constants,
    # and torch 2.13's CPU inductor miscompiles their integer divisions (``arange(L) // block_size``).
    # Outside inference mode: cached, they must stay usable by autograd.
    @torch.compiler.disable
    @torch.inference_mode(False)
    def _build_tables(self) -> dict[str, torch.Tensor]:
        F, H, W, T, bs = self.frames, self.height, self.width, self.text_tokens, self.block_size
        L, V = self.num_tokens, self.video_tokens
        th, tw = self.tile
        video_offset = T if self.text_first else 0
        text_offset = 0 if self.text_first else V

        # Every token's tile (f, tile row, tile column) and its row-major rank inside the tile:
        # sorting by that key is the tile order (edge tiles are ragged, so the key is not dense).
        f, y, x = torch.meshgrid(torch.arange(F), torch.arange(H), torch.arange(W), indexing="ij")
        nty, ntx = self.tiles_per_frame
        tile_id = (f * nty + y // th) * ntx + x // tw
        key = (tile_id * th + y % th) * tw + x % tw
        video = key.flatten().argsort(stable=True) + video_offset  # original index of each video slot
        text = torch.arange(T) + text_offset
        order = torch.cat([text, video] if self.text_first else [video, text])  # (L,)
        perm = torch.cat([order, torch.full((self.num_slots - L,), -1, dtype=torch.long)])

        if self.tiled:  # the sequence is the tile order: slot i holds token i
            perm = torch.cat([torch.arange(L), perm[L:]])
        inverse = torch.empty(L, dtype=torch.long)
        inverse[perm[:L]] = torch.arange(L)
        block_of_slot = torch.arange(L) // bs
        block_tokens = torch.bincount(block_of_slot, minlength=self.num_blocks)

        # text slots: [0, T) or [V, L) of the tile order
        text_slot = (block_of_slot < 0) if T == 0 else (
            torch.arange(L) < T if self.text_first else torch.arange(L) >= V
        )
        is_text_block = torch.zeros(self.num_blocks, dtype=torch.bool).index_fill_(0, block_of_slot[text_slot], True)

        # centre of each block's video tokens in token units (frame, row, column); NaN: no video token
        local = order - video_offset
        fyx = torch.stack([local // (H * W), (local % (H * W)) // W, local % W], -1).double()
        video_slot = ~text_slot
        sums = torch.zeros(self.num_blocks, 3, dtype=torch.float64).index_add_(0, block_of_slot[video_slot], fyx[video_slot])
        counts = torch.zeros(self.num_blocks, dtype=torch.float64).index_add_(
            0, block_of_slot[video_slot], torch.ones(int(video_slot.sum()), dtype=torch.float64)
        )
        centers = sums / counts[:, None]  # 0/0 = NaN for text-only blocks
        return {
            "perm": perm,
            "inverse_perm": inverse,
            "block_of_token": inverse // bs,
            "block_tokens": block_tokens,
            "block_centers": centers,
            "is_text_block": is_text_block,
        }

    def on(self, device) -> SimpleNamespace:
        """The layout's index tables on ``device``, copied once and cached.

        Attributes: ``perm``, ``inverse_perm``, ``block_of_token`` (int64 ``(L,)``: block of each
        token), ``block_tokens``, ``block_centers``, ``is_text_block`` — as the properties of the
        same names. Planners use this so that a plan on the GPU costs no host-to-device copy.
        """
        key = str(torch.device(device))
        tables = self._device_tables.get(key)
        return tables if tables is not None else self._copy_tables(key)

    @torch.compiler.disable  # filled once, eagerly (see _build_tables); a compiled graph reads the cache
    @torch.inference_mode(False)
    def _copy_tables(self, device: str) -> SimpleNamespace:
        tables = SimpleNamespace(**{name: t.to(device) for name, t in self._tables.items()})
        self._device_tables[device] = tables
        return tables

    @property
    def perm(self) -> torch.Tensor:
        """int64 ``(S,)``: original token index of each tile-order slot; ``-1`` for the missing slots
        of a short last block (``perm[:L]`` is the tile order itself)."""
        return self._tables["perm"]

    @property
    def inverse_perm(self) -> torch.Tensor:
        """int64 ``(L,)``: tile-order slot of each original token (``perm[inverse_perm] == arange(L)``)."""
        return self._tables["inverse_perm"]

    @property
    def block_tokens(self) -> torch.Tensor:
        """int64 ``(NB,)``: real tokens in each block (``block_size``, except a short last block)."""
        return self._tables["block_tokens"]

    @property
    def block_centers(self) -> torch.Tensor:
        """float64 ``(NB, 3)``: mean ``(frame, row, column)`` of each block's video tokens, in token
        units; NaN for blocks of text tokens only."""
        return self._tables["block_centers"]

    @property
    def is_text_block(self) -> torch.Tensor:
        """bool ``(NB,)``: the block holds at least one text token."""
        return self._tables["is_text_block"]

    # ------------------------------------------------------------------ moving tensors
    def to_tiles(self, x: torch.Tensor, dim: int = -2) -> torch.Tensor:
        """Gather ``x`` (``L`` along ``dim``) into tile order (``S`` along ``dim``); missing slots are zero."""
        dim = dim % x.dim()
        if x.shape[dim] != self.num_tokens:
            raise ValueError(f"Expect size {self.num_tokens} (layout.num_tokens) along dim {dim} but got {x.shape[dim]}")
        perm = self.on(x.device).perm
        out = x.index_select(dim, perm.clamp(min=0))
        shape = [1] * x.dim()
        shape[dim] = -1
        return out.masked_fill((perm < 0).view(shape), 0)

    def from_tiles(self, x: torch.Tensor, dim: int = -2) -> torch.Tensor:
        """Inverse of :meth:`to_tiles`: ``S`` (or ``L``) tile-order slots along ``dim`` back to ``L``
        tokens in original order."""
        dim = dim % x.dim()
        if x.shape[dim] not in (self.num_slots, self.num_tokens):
            raise ValueError(
                f"Expect size {self.num_slots} (layout.num_slots) or {self.num_tokens} along dim {dim} "
                f"but got {x.shape[dim]}"
            )
        return x.index_select(dim, self.on(x.device).inverse_perm)

    def __str__(self) -> str:
        text = f", text_tokens={self.text_tokens} ({'first' if self.text_first else 'last'})" if self.text_tokens else ""
        text += ", tiled" if self.tiled else ""
        return (
            f"VideoLayout({self.frames}x{self.height}x{self.width}{text}, L={self.num_tokens}, tile={self.tile}, "
            f"block_size={self.block_size}, blocks={self.num_blocks})"
        )
