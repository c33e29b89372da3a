"""``BlockPlan``: which blocks of full attention to compute — data only, built once, reused.

Planners produce it, kernels consume it; neither side decides anything about the other.
"""

from __future__ import annotations

import torch

from .layout import VideoLayout

__all__ = ["BlockPlan"]


class PlanData:
    """What every plan type shares with the backends: the launch structs derived from it, and whether its
    tensors are known to meet the type's invariants (``trusted``: a planner built them so, or ``validate``
    passed); ``sparse_attention`` validates any other plan (built by hand from user tensors) once before its first
    launch, since a kernel reading an index out of range crashes the process."""

    def __init__(self, *, trusted: bool = False):
        self._launches: dict[tuple, object] = {}
        self._trusted = trusted

    def launch(self, kind: type, *key):
        """The launch struct ``kind`` of this plan for ``key`` (e.g. the inputs' batch and heads): what a backend's
        kernel launch reads of the plan, as one frozen dataclass built and checked by ``kind.build(self, *key)``
        once per (kind, key) and kept with the plan, so a reused plan launches with no preparatory work. A struct
        is made for one plan type (``kind.plan_type``); each backend defines its own."""
        if not isinstance(self, kind.plan_type):
            raise TypeError(f"Expect a {kind.plan_type.__name__} for {kind.__name__} but got a {type(self).__name__}")
        cache_key = (kind, *key)
        if cache_key not in self._launches:
            self._launches[cache_key] = kind.build(self, *key)
        return self._launches[cache_key]

    def validate_once(self):
        """:meth:`validate` unless the plan is known valid (a planner built it, or it passed before); returns it."""
        return self if self._trusted else self.validate()


class _CSRPlan(PlanData):
    """What both plan granularities share: per (batch, head, query block), a CSR list of kept keys.

    Subclasses name their two tensors (``_COUNTS``, ``_INDICES``, ``_WIDTH``), say what an index
    addresses (``_num_keys``: blocks or tokens), count the score entries they compute
    (``density_per_head``), and map their dense form to key blocks (``_block_coverage``).
    """

    _COUNTS: str
    _INDICES: str
    _WIDTH: str
    # A row that keeps every key may leave its list unstored (narrower than the key count): TokenPlan's
    # dense text rows, so that one text token does not widen every row's list to L.
    _IMPLICIT_FULL_ROWS = False

    def __init__(self, layout: VideoLayout, counts: torch.Tensor, indices: torch.Tensor, method: str = "custom", *,
                 keeps_everything: bool = False, trusted: bool = False):
        if not isinstance(layout, VideoLayout):
            raise TypeError(f"Expect layout to be a VideoLayout but got {type(layout).__name__}")
        nb, c, i, w = layout.num_blocks, self._COUNTS, self._INDICES, self._WIDTH
        if not isinstance(counts, torch.Tensor) or counts.dtype != torch.int32 or counts.dim() != 3:
            raise TypeError(f"Expect {c} to be an int32 tensor (B, H, NB) but got {_describe(counts)}")
        if not isinstance(indices, torch.Tensor) or indices.dtype != torch.int32 or indices.dim() != 4:
            raise TypeError(f"Expect {i} to be an int32 tensor (B, H, NB, {w}) but got {_describe(indices)}")
        if counts.shape[-1] != nb or indices.shape[:3] != counts.shape:
            raise ValueError(
                f"Expect {c} (B, H, {nb}) and {i} (B, H, {nb}, {w}) for layout.num_blocks={nb} "
                f"but got {tuple(counts.shape)} and {tuple(indices.shape)}"
            )
        if counts.device != indices.device:
            raise ValueError(f"Expect {c} and {i} on one device but got {counts.device} and {indices.device}")
        super().__init__(trusted=trusted)
        self.layout = layout
        self._counts = counts
        self._indices = indices
        self.method = method
        self._keeps_last: torch.Tensor | None = None  # BlockPlan.keeps_last_block, kept once read
        # stated by the planner that keeps every block (``dense``): backends may then run dense attention
        # without reading the lists (a host-known fact; computing it from the lists would sync)
        self.keeps_everything = keeps_everything

    # ------------------------------------------------------------------ what subclasses define
    @property
    def _num_keys(self) -> int:
        raise NotImplementedError

    def _block_coverage(self) -> torch.Tensor:
        """float ``(B, H, NB, NB)``: fraction of each key block's real tokens that query block m computes."""
        raise NotImplementedError

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
        return tuple(self._counts.shape[:2])

    @property
    def device(self) -> torch.device:
        return self._counts.device

    @property
    def perm(self) -> torch.Tensor:
        """int64 ``(NB * block_size,)`` on the plan's device: ``layout.perm`` (the query rows of each block)."""
        return self.layout.on(self.device).perm

    def _full_rows(self) -> torch.Tensor:
        """bool ``(B, H, NB)``: rows whose list is implicit (they keep every key)."""
        if not self._IMPLICIT_FULL_ROWS:
            return torch.zeros_like(self._counts, dtype=torch.bool)
        return self._counts == self._num_keys

    def _kept_valid(self) -> tuple[torch.Tensor, torch.Tensor]:
        valid = torch.arange(self._indices.shape[-1], device=self.device) < self._counts.unsqueeze(-1)
        return self._indices.long().clamp(0, self._num_keys - 1), valid & ~self._full_rows().unsqueeze(-1)

    @property
    def density(self) -> float:
        """Fraction of the real ``L x L`` score entries that are computed, averaged over batch and heads."""
        return float(self.density_per_head().mean())

    def density_per_head(self) -> torch.Tensor:
        """float64 ``(B, H)``: the computed fraction of real score entries of each batch element and
        head (subclasses compute it from the counts: no gather of the lists)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ conversions
    def to_dense(self) -> torch.Tensor:
        """bool ``(B, H, NB, num_keys)``: True where query block m computes key index n."""
        idx, valid = self._kept_valid()
        hits = torch.zeros(*self._counts.shape, self._num_keys, dtype=torch.int32, device=self.device)
        # scatter_add, not scatter: the unspecified tail may repeat a kept index and must not erase it.
        return (hits.scatter_add_(-1, idx, valid.to(torch.int32)) > 0) | self._full_rows().unsqueeze(-1)

    # ------------------------------------------------------------------ checks
    def validate(self):
        """Check the invariants in the class docstring; raise ``ValueError`` naming the first broken one."""
        n, c, i, w = self._num_keys, self._COUNTS, self._INDICES, self._WIDTH
        counts, width = self._counts, self._indices.shape[-1]
        if bool((counts < 1).any()) or bool((counts > n).any()):
            raise ValueError(f"Expect 1 <= {c} <= {n} but got values in [{int(counts.min())}, {int(counts.max())}]")
        listed = counts.masked_fill(self._full_rows(), 0)
        if int(listed.max()) > width:
            raise ValueError(f"Expect {c} <= {w}={width} but got {int(listed.max())}")
        valid = torch.arange(width, device=self.device) < listed.unsqueeze(-1)
        idx = self._indices.long()
        if bool(((idx < 0) | (idx >= n))[valid].any()):
            raise ValueError(f"Expect {i} in [0, {n}) but found out-of-range entries")
        if bool((idx[..., 1:] <= idx[..., :-1])[valid[..., 1:]].any()):
            raise ValueError(f"Expect {i} strictly ascending (sorted, no duplicates) within {c}")
        full = self._block_coverage() >= 1 - 1e-6
        if not bool(full.diagonal(dim1=-2, dim2=-1).all()):
            raise ValueError("Expect every query block to keep its own block but some do not")
        text = self.layout.on(self.device).is_text_block
        if bool(text.any()) and not (bool(full[..., text].all()) and bool(full[..., text, :].all())):
            raise ValueError("Expect text tokens attended densely in both directions but some text pairs are dropped")
        self._trusted = True
        return self

    # ------------------------------------------------------------------ FlexAttention-style conveniences
    def __getitem__(self, index):
        """Slice batch and heads: ``plan[b]``, ``plan[:, h]``, ``plan[-1]`` (integer indices keep the
        dimension, so the result is still a plan; out-of-range integers raise ``IndexError``)."""
        index = batch_head_slices(index, self.shape)
        counts, indices = self._counts[index], self._indices[index]
        if 0 in counts.shape[:2]:
            raise IndexError(f"Expect a non-empty selection but plan{list(index)} of shape {self.shape} is empty")
        return self._like(counts, indices)

    def to(self, device):
        return self._like(self._counts.to(device), self._indices.to(device))

    def _like(self, counts: torch.Tensor, indices: torch.Tensor):
        """This plan with its lists sliced or moved: what is known of it (``keeps_everything``, checked) holds."""
        return type(self)(self.layout, counts, indices, self.method, keeps_everything=self.keeps_everything,
                          trusted=self._trusted)

    def to_string(self, grid_size: int = 20, limit: int = 4) -> str:
        """ASCII picture of each (batch, head) plan over (query block, key block), shrunk to
        ``grid_size``: █ every key of the cell computed, ░ some, blank none."""
        coverage = self._block_coverage().float()
        B, H, nb, _ = coverage.shape
        cells = min(grid_size, nb)
        pooled = torch.nn.functional.adaptive_avg_pool2d(coverage.reshape(B * H, 1, nb, nb), cells)
        pooled = pooled.reshape(B, H, cells, cells)
        lines = []
        for n, (b, h) in enumerate((b, h) for b in range(B) for h in range(H)):
            if n == limit:
                lines.append(f"... {B * H - limit} more (batch, head) entries; use plan[b, h].to_string()")
                break
            lines.append(f"batch {b}, head {h}: density {float(self.density_per_head()[b, h]):.1%}")
            for row in pooled[b, h]:
                lines.append("".join("██" if v >= 1 - 1e-6 else "░░" if v > 0 else "  " for v in row.tolist()))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(method={self.method!r}, shape={self.shape}, num_blocks={self.num_blocks}, "
            f"block_size={self.block_size}, {self._WIDTH}={self._indices.shape[-1]}, density={self.density:.2%}, "
            f"{self._COUNTS}={tuple(self._counts.shape)}, {self._INDICES}={tuple(self._indices.shape)}, "
            f"device={self.device})"
        )

    def __str__(self) -> str:
        return f"{self!r}\n{self.to_string()}"


class BlockPlan(_CSRPlan):
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

    Build plans with a planner (:func:`sparsevid.plan`) or :meth:`from_block_mask`. A plan built from
    tensors (``BlockPlan(layout, kv_num_blocks, kv_indices)``, :meth:`from_block_mask`) is validated
    once, before its first :func:`sparsevid.sparse_attention`. Keyword-only constructor arguments, for
    planners: ``keeps_everything=True`` states that every block is kept (backends may then run dense
    attention without reading the lists); ``trusted=True`` states that the lists were built to the
    invariants (a planner's, valid by construction and tested), so they are never read on the host before
    a launch (a wrong index there crashes a GPU kernel).
    """

    _COUNTS, _INDICES, _WIDTH = "kv_num_blocks", "kv_indices", "max_kept"

    layout: VideoLayout
    method: str

    @property
    def kv_num_blocks(self) -> torch.Tensor:
        """int32 ``(B, H, NB)``."""
        return self._counts

    @property
    def kv_indices(self) -> torch.Tensor:
        """int32 ``(B, H, NB, max_kept)``."""
        return self._indices

    @property
    def max_kept(self) -> int:
        return self._indices.shape[-1]

    @classmethod
    def from_block_mask(cls, layout: VideoLayout, keep: torch.Tensor, method: str = "custom", *,
                        to_csr=None, keeps_everything: bool = False, trusted: bool = False) -> "BlockPlan":
        """The plan computing exactly the blocks where ``keep`` (bool ``(B, H, NB, NB)``) is True. ``to_csr(keep,
        width)`` builds the lists: by default in PyTorch (:func:`_dense_to_csr`); the planners pass
        :func:`sparsevid.kernels.csr.dense_to_csr` (one Triton pass on CUDA, the same lists).
        ``keeps_everything``, ``trusted``: see the constructor."""
        if not isinstance(layout, VideoLayout):
            raise TypeError(f"Expect layout to be a VideoLayout but got {type(layout).__name__}")
        if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or keep.dim() != 4:
            raise TypeError(f"Expect keep to be a bool tensor (B, H, NB, NB) but got {_describe(keep)}")
        nb = layout.num_blocks
        if keep.shape[-2:] != (nb, nb):
            raise ValueError(f"Expect keep of shape (B, H, {nb}, {nb}) but got {tuple(keep.shape)}")
        # Full width NB: no host sync to learn the longest row (the tail is never read).
        return cls(layout, *(to_csr or _dense_to_csr)(keep, width=nb), method, keeps_everything=keeps_everything,
                   trusted=trusted)

    @property
    def _num_keys(self) -> int:
        return self.num_blocks

    def keeps_last_block(self) -> torch.Tensor:
        """bool ``(B, H, NB)``: the row keeps the last key block, the only one that may be short
        (indices ascend, so it is a row's last entry). Kept with the plan."""

        if self._keeps_last is None:
            tail = self._indices.gather(-1, (self._counts.long() - 1).clamp(min=0).unsqueeze(-1)).squeeze(-1)
            self._keeps_last = tail == self.num_blocks - 1
        return self._keeps_last

    def density_per_head(self) -> torch.Tensor:
        """float64 ``(B, H)``: the computed fraction of real score entries of each batch element and head
        (from the counts: every block but the last holds ``block_size`` tokens; O(NB) per head)."""
        tokens = self.layout.on(self.device).block_tokens
        short = self.block_size - int(self.layout.block_tokens[-1])
        kept = self._counts.long() * self.block_size - short * self.keeps_last_block().long()
        return (kept.double() * tokens.double()).sum(-1) / float(self.layout.num_tokens) ** 2

    def _block_coverage(self) -> torch.Tensor:
        return self.to_dense().float()

    def to_mask(self) -> torch.Tensor:
        """bool ``(B, H, L, L)`` in the original token order; True = score computed. For small ``L`` (tests)."""
        block_of_token = self.layout.on(self.device).block_of_token  # (L,)
        return self.to_dense()[:, :, block_of_token][:, :, :, block_of_token]

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


def batch_head_slices(index, shape: tuple[int, int]) -> tuple[slice, ...]:
    """A plan's ``[index]`` (ints and slices over batch, heads) as slices: integer indices keep the dimension,
    out-of-range integers raise ``IndexError``."""
    if not isinstance(index, tuple):
        index = (index,)
    if len(index) > 2:
        raise IndexError(f"Expect at most 2 indices (batch, head) but got {len(index)}")
    slices = []
    for dim, (i, size) in enumerate(zip(index, shape)):
        if isinstance(i, int) and not isinstance(i, bool):
            if not -size <= i < size:
                raise IndexError(f"Expect {('batch', 'head')[dim]} index in [{-size}, {size}) but got {i}")
            i %= size
            i = slice(i, i + 1)
        elif not isinstance(i, slice):
            raise TypeError(f"Expect int or slice indices but got {type(i).__name__}")
        slices.append(i)
    return tuple(slices)


def _dense_to_csr(keep: torch.Tensor, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """bool ``(B, H, NB, N)`` -> (int32 counts ``(B, H, NB)``, int32 ascending indices ``(B, H, NB, width)``).

    ``width`` defaults to the longest row (one host sync). No sort: each kept index is scattered to
    its rank among the row's kept indices (a cumulative sum); the tail is zeros. The planners and the ring
    build their lists with :func:`sparsevid.kernels.csr.dense_to_csr` (one Triton pass on CUDA): the plan sits
    below the kernels and does not reach up to them.
    """
    n = keep.shape[-1]
    counts = keep.sum(-1, dtype=torch.int32)
    if width is None:
        width = max(int(counts.max()), 1) if counts.numel() else 1
    rank = keep.cumsum(-1, dtype=torch.int32) - 1
    slot = torch.where(keep & (rank < width), rank, width).long()  # everything else to a dump column
    indices = torch.zeros(*keep.shape[:-1], width + 1, dtype=torch.int32, device=keep.device)
    values = torch.arange(n, dtype=torch.int32, device=keep.device).expand_as(slot)
    return counts, indices.scatter_(-1, slot, values)[..., :width].contiguous()


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__
