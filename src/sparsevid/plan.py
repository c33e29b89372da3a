"""``BlockPlan``: which blocks of full attention to compute — data only, built once, reused.

Planners produce it, kernels consume it; neither side decides anything about the other.
"""

from __future__ import annotations

import torch

from .layout import VideoLayout

__all__ = ["BlockPlan"]


class BlockPlan:
    r"""A block-sparse attention plan over a :class:`VideoLayout`'s tile order.

    Basics
    ------
    The sequence is cut into ``NB = layout.num_blocks`` blocks of ``block_size`` slots in *tile
    order* (``layout.perm`` maps each slot to its original token, ``-1`` = padding). For every
    batch element ``b``, head ``h`` and query block ``m``, the plan lists the key blocks whose
    scores are computed, in CSR form like FlexAttention's ``BlockMask``:

    - ``kv_num_blocks`` int32 ``(B, H, NB)``: how many key blocks query block ``m`` keeps.
    - ``kv_indices`` int32 ``(B, H, NB, max_kept)``: their block indices, strictly ascending in the
      first ``kv_num_blocks[b, h, m]`` entries; the tail is unspecified.

    The token-level mask, in tile order, is rebuilt by::

        dense = zeros(B, H, NB, NB, dtype=bool)
        for b, h, m in product(range(B), range(H), range(NB)):
            for n in kv_indices[b, h, m, :kv_num_blocks[b, h, m]]:
                dense[b, h, m, n] = True
        slot_mask = dense.repeat_interleave(block_size, -2).repeat_interleave(block_size, -1)
        # & real query slot & real key slot, then indexed with layout.inverse_perm on both sides

    Details
    -------
    - ``B`` or ``H`` may be 1 (also as a stride-0 ``expand``) and then broadcasts over q's batch
      or heads: a static plan (``window``, ``dense``) costs no memory per head.
    - Invariants (:meth:`validate`): indices in range, ascending, unique; every query block keeps
      its own block (so no real query row has an empty softmax); every query block keeps every
      text block, and text query blocks keep every block (text is attended densely both ways).
    - ``density`` counts real score entries only: padding slots are neither computed nor counted.

    Build plans with a planner (:func:`sparsevid.plan`) or :meth:`from_block_mask`.
    """

    layout: VideoLayout
    kv_num_blocks: torch.Tensor
    kv_indices: torch.Tensor
    method: str

    def __init__(self, layout: VideoLayout, kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor, method: str = "custom"):
        if not isinstance(layout, VideoLayout):
            raise TypeError(f"Expect layout to be a VideoLayout but got {type(layout).__name__}")
        nb = layout.num_blocks
        if not isinstance(kv_num_blocks, torch.Tensor) or kv_num_blocks.dtype != torch.int32 or kv_num_blocks.dim() != 3:
            raise TypeError(f"Expect kv_num_blocks to be an int32 tensor (B, H, NB) but got {_describe(kv_num_blocks)}")
        if not isinstance(kv_indices, torch.Tensor) or kv_indices.dtype != torch.int32 or kv_indices.dim() != 4:
            raise TypeError(f"Expect kv_indices to be an int32 tensor (B, H, NB, max_kept) but got {_describe(kv_indices)}")
        if kv_num_blocks.shape[-1] != nb or kv_indices.shape[:3] != kv_num_blocks.shape:
            raise ValueError(
                f"Expect kv_num_blocks (B, H, {nb}) and kv_indices (B, H, {nb}, max_kept) for layout.num_blocks={nb} "
                f"but got {tuple(kv_num_blocks.shape)} and {tuple(kv_indices.shape)}"
            )
        if kv_num_blocks.device != kv_indices.device:
            raise ValueError(f"Expect kv tensors on one device but got {kv_num_blocks.device} and {kv_indices.device}")
        self.layout = layout
        self.kv_num_blocks = kv_num_blocks
        self.kv_indices = kv_indices
        self.method = method
        self._perm = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_block_mask(cls, layout: VideoLayout, keep: torch.Tensor, method: str = "custom") -> "BlockPlan":
        """The plan computing exactly the blocks where ``keep`` (bool ``(B, H, NB, NB)``) is True."""
        if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or keep.dim() != 4:
            raise TypeError(f"Expect keep to be a bool tensor (B, H, NB, NB) but got {_describe(keep)}")
        nb = layout.num_blocks
        if keep.shape[-2:] != (nb, nb):
            raise ValueError(f"Expect keep of shape (B, H, {nb}, {nb}) but got {tuple(keep.shape)}")
        # Full width NB: no host sync to learn the longest row (the tail is never read).
        return cls(layout, *_dense_to_csr(keep, width=nb), method)

    # ------------------------------------------------------------------ properties
    @property
    def block_size(self) -> int:
        return self.layout.block_size

    @property
    def num_blocks(self) -> int:
        return self.layout.num_blocks

    @property
    def shape(self) -> tuple[int, int]:
        """``(B, H)`` of the plan (1 where it broadcasts)."""
        return tuple(self.kv_num_blocks.shape[:2])

    @property
    def max_kept(self) -> int:
        return self.kv_indices.shape[-1]

    @property
    def device(self) -> torch.device:
        return self.kv_num_blocks.device

    @property
    def perm(self) -> torch.Tensor:
        """int64 ``(NB * block_size,)`` on the plan's device: ``layout.perm``."""
        if self._perm is None:
            self._perm = self.layout.on(self.device).perm
        return self._perm

    def _kept_valid(self) -> tuple[torch.Tensor, torch.Tensor]:
        valid = torch.arange(self.max_kept, device=self.device) < self.kv_num_blocks.unsqueeze(-1)
        return self.kv_indices.long().clamp(0, self.num_blocks - 1), valid

    @property
    def density(self) -> float:
        """Fraction of the real ``L x L`` score entries that are computed, averaged over batch and heads."""
        return float(self.density_per_head().mean())

    def density_per_head(self) -> torch.Tensor:
        """float64 ``(B, H)``: the computed fraction of real score entries of each batch element and head."""
        tokens = self.layout.on(self.device).block_tokens.double()
        idx, valid = self._kept_valid()
        entries = (tokens[idx] * valid).sum(-1) * tokens  # (B, H, NB)
        return entries.sum(-1) / float(self.layout.num_tokens) ** 2

    # ------------------------------------------------------------------ conversions
    def to_dense(self) -> torch.Tensor:
        """bool ``(B, H, NB, NB)``: True where a (query block, key block) pair is computed."""
        idx, valid = self._kept_valid()
        hits = torch.zeros(*self.kv_num_blocks.shape, self.num_blocks, dtype=torch.int32, device=self.device)
        # scatter_add, not scatter: the unspecified tail may repeat a kept index and must not erase it.
        return hits.scatter_add_(-1, idx, valid.to(torch.int32)) > 0

    def to_mask(self) -> torch.Tensor:
        """bool ``(B, H, L, L)`` in the original token order; True = score computed. For small ``L`` (tests)."""
        slot_block = self.layout.on(self.device).block_of_token  # (L,)
        dense = self.to_dense()
        return dense[:, :, slot_block][:, :, :, slot_block]

    def to_block_mask(self):
        """FlexAttention ``BlockMask`` for q, k, v gathered into tile order with ``layout.to_tiles``.

        Key blocks without padding are listed as *full* blocks (no ``mask_mod`` evaluated); key blocks
        with padding are *partial*, and the ``mask_mod`` hides their padding slots.
        """
        from torch.nn.attention.flex_attention import BlockMask

        real = self.perm >= 0
        full_key_block = self.layout.on(self.device).block_tokens == self.block_size
        dense = self.to_dense()
        # FlexAttention reads the number of key blocks off kv_indices' last dim: give it all NB.
        nb = self.num_blocks
        full = _dense_to_csr(dense & full_key_block, width=nb)
        partial = _dense_to_csr(dense & ~full_key_block, width=nb)

        bs = self.block_size
        pb, ph = self.shape

        # Eager FlexAttention evaluates only mask_mod (no block skipping), so it encodes the whole
        # plan; compiled FlexAttention evaluates it on the partial (padded) blocks alone.
        def plan_mask(b, h, q_idx, kv_idx):
            return real[kv_idx] & dense[b * (pb > 1), h * (ph > 1), q_idx // bs, kv_idx // bs]

        return BlockMask.from_kv_blocks(
            *partial,
            *full,
            BLOCK_SIZE=self.block_size,
            mask_mod=plan_mask,
            seq_lengths=(self.layout.num_slots, self.layout.num_slots),
        )

    # ------------------------------------------------------------------ checks
    def validate(self) -> "BlockPlan":
        """Check the invariants in the class docstring; raise ``ValueError`` naming the first broken one."""
        nb = self.num_blocks
        counts = self.kv_num_blocks
        if bool((counts < 1).any()) or bool((counts > nb).any()):
            raise ValueError(f"Expect 1 <= kv_num_blocks <= {nb} but got values in [{int(counts.min())}, {int(counts.max())}]")
        if int(counts.max()) > self.max_kept:
            raise ValueError(f"Expect kv_num_blocks <= max_kept={self.max_kept} but got {int(counts.max())}")
        valid = torch.arange(self.max_kept, device=self.device) < counts.unsqueeze(-1)
        idx = self.kv_indices.long()
        if bool(((idx < 0) | (idx >= nb))[valid].any()):
            raise ValueError(f"Expect kv_indices in [0, {nb}) but found out-of-range entries")
        step = idx[..., 1:] - idx[..., :-1]
        if bool((step <= 0)[valid[..., 1:]].any()):
            raise ValueError("Expect kv_indices strictly ascending (sorted, no duplicates) within kv_num_blocks")
        dense = self.to_dense()
        if not bool(dense.diagonal(dim1=-2, dim2=-1).all()):
            raise ValueError("Expect every query block to keep its own block but some do not")
        text = self.layout.on(self.device).is_text_block
        if bool(text.any()) and not (bool(dense[..., text].all()) and bool(dense[..., text, :].all())):
            raise ValueError("Expect text blocks attended densely in both directions but some text pairs are dropped")
        return self

    # ------------------------------------------------------------------ FlexAttention-style conveniences
    def __getitem__(self, index) -> "BlockPlan":
        """Slice batch and heads: ``plan[b]``, ``plan[:, h]`` (integer indices keep the dimension)."""
        if not isinstance(index, tuple):
            index = (index,)
        if len(index) > 2:
            raise IndexError(f"Expect at most 2 indices (batch, head) but got {len(index)}")
        index = tuple(slice(i, i + 1) if isinstance(i, int) else i for i in index)
        return BlockPlan(self.layout, self.kv_num_blocks[index], self.kv_indices[index], self.method)

    def to(self, device) -> "BlockPlan":
        return BlockPlan(self.layout, self.kv_num_blocks.to(device), self.kv_indices.to(device), self.method)

    def to_string(self, grid_size: int = 20, limit: int = 4) -> str:
        """ASCII picture of each (batch, head) block mask shrunk to ``grid_size``: █ all kept, ░ some, blank none."""
        dense = self.to_dense().float()
        B, H, nb, _ = dense.shape
        cells = min(grid_size, nb)
        pooled = torch.nn.functional.adaptive_avg_pool2d(dense.reshape(B * H, 1, nb, nb), cells).reshape(B, H, cells, cells)
        lines = []
        for n, (b, h) in enumerate((b, h) for b in range(B) for h in range(H)):
            if n == limit:
                lines.append(f"... {B * H - limit} more (batch, head) entries; use plan[b, h].to_string()")
                break
            lines.append(f"batch {b}, head {h}: density {float(self.density_per_head()[b, h]):.1%}")
            for row in pooled[b, h]:
                lines.append("".join("██" if v >= 1 else "░░" if v > 0 else "  " for v in row.tolist()))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (
            f"BlockPlan(method={self.method!r}, shape={self.shape}, num_blocks={self.num_blocks}, "
            f"block_size={self.block_size}, max_kept={self.max_kept}, density={self.density:.2%}, "
            f"kv_num_blocks={tuple(self.kv_num_blocks.shape)}, kv_indices={tuple(self.kv_indices.shape)}, "
            f"device={self.device})"
        )

    def __str__(self) -> str:
        return f"{self!r}\n{self.to_string()}"


def _dense_to_csr(keep: torch.Tensor, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """bool ``(B, H, NB, N)`` -> (int32 counts ``(B, H, NB)``, int32 ascending indices ``(B, H, NB, width)``).

    ``width`` defaults to the longest row (one host sync).
    """
    nb = keep.shape[-1]
    counts = keep.sum(-1, dtype=torch.int32)
    if width is None:
        width = max(int(counts.max()), 1) if counts.numel() else 1
    arange = torch.arange(nb, device=keep.device)
    # Kept blocks sort first (ascending index); the rest fill the unspecified tail.
    order = torch.where(keep, arange, nb + arange)
    indices = order.sort(dim=-1).values if width == nb else order.topk(width, dim=-1, largest=False).values
    indices = torch.where(indices < nb, indices, indices - nb).to(torch.int32)
    return counts, indices.contiguous()


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__
