"""``TokenPlan``: M x 1 sparsity — per query block, the individual key *tokens* to compute.

The sibling of :class:`~sparsevid.plan.BlockPlan` for fine-grained planners (``finegrained``,
FG-Attn, arXiv 2509.16518): the query side is still cut into the layout's tile blocks of
``M = block_size`` rows, but each query block keeps its own list of key tokens instead of whole
key blocks. Data only: planners build it, the gather kernel consumes it.
"""

from __future__ import annotations

import torch

from .layout import VideoLayout
from .plan import _dense_to_csr, _describe

__all__ = ["TokenPlan"]


class TokenPlan:
    r"""A fine-grained (M x 1) attention plan: per query block, the kept key tokens.

    Basics
    ------
    Queries are grouped as in :class:`~sparsevid.plan.BlockPlan`: ``NB = layout.num_blocks``
    blocks of ``block_size`` tile-order slots (``layout.perm`` maps slots to original tokens, ``-1``
    is padding). For every batch element ``b``, head ``h`` and query block ``m``, the plan lists the
    key *tokens* whose scores are computed for all of the block's query rows, in CSR form:

    - ``kv_num_tokens`` int32 ``(B, H, NB)``: how many key tokens query block ``m`` keeps.
    - ``kv_tokens`` int32 ``(B, H, NB, max_tokens)``: their ORIGINAL token indices (``0 <= j < L``,
      not tile-order slots, so a kernel gathers K/V rows directly), strictly ascending in the first
      ``kv_num_tokens[b, h, m]`` entries; the tail is unspecified.

    The token-level mask, in original order, is rebuilt by::

        mask = zeros(B, H, L, L, dtype=bool)
        for b, h, m in product(range(B), range(H), range(NB)):
            rows = perm[m * block_size:(m + 1) * block_size]; rows = rows[rows >= 0]
            cols = kv_tokens[b, h, m, :kv_num_tokens[b, h, m]]
            mask[b, h, rows[:, None], cols[None, :]] = True

    Details
    -------
    - Why a sibling type and not a ``BlockPlan`` with key blocks of size 1: the query side keeps
      the tile permutation and the ``M``-row tensor-core tile, the key side drops both (no
      padding, no permutation: a kept token is a row address). One type per granularity keeps
      both kernels' contracts short; :func:`sparsevid.sparse_attention` accepts either.
    - ``B`` or ``H`` may be 1 (also as a stride-0 ``expand``) and then broadcasts over q's batch or
      heads.
    - Invariants (:meth:`validate`): tokens in range, ascending, unique; every query block keeps all
      the tokens of its own block (no real query row has an empty softmax) and every text token;
      text query blocks keep every token (text is attended densely both ways).
    - ``density`` counts real score entries: ``kv_num_tokens[b, h, m]`` times the real query rows
      of block ``m``, summed, over ``L**2``.

    Build plans with a planner (``sparsevid.plan(..., method="finegrained")``) or
    :meth:`from_token_mask`.
    """

    layout: VideoLayout
    kv_num_tokens: torch.Tensor
    kv_tokens: torch.Tensor
    method: str

    def __init__(self, layout: VideoLayout, kv_num_tokens: torch.Tensor, kv_tokens: torch.Tensor, method: str = "custom"):
        if not isinstance(layout, VideoLayout):
            raise TypeError(f"Expect layout to be a VideoLayout but got {type(layout).__name__}")
        nb = layout.num_blocks
        if not isinstance(kv_num_tokens, torch.Tensor) or kv_num_tokens.dtype != torch.int32 or kv_num_tokens.dim() != 3:
            raise TypeError(f"Expect kv_num_tokens to be an int32 tensor (B, H, NB) but got {_describe(kv_num_tokens)}")
        if not isinstance(kv_tokens, torch.Tensor) or kv_tokens.dtype != torch.int32 or kv_tokens.dim() != 4:
            raise TypeError(f"Expect kv_tokens to be an int32 tensor (B, H, NB, max_tokens) but got {_describe(kv_tokens)}")
        if kv_num_tokens.shape[-1] != nb or kv_tokens.shape[:3] != kv_num_tokens.shape:
            raise ValueError(
                f"Expect kv_num_tokens (B, H, {nb}) and kv_tokens (B, H, {nb}, max_tokens) for layout.num_blocks={nb} "
                f"but got {tuple(kv_num_tokens.shape)} and {tuple(kv_tokens.shape)}"
            )
        if kv_num_tokens.device != kv_tokens.device:
            raise ValueError(f"Expect kv tensors on one device but got {kv_num_tokens.device} and {kv_tokens.device}")
        self.layout = layout
        self.kv_num_tokens = kv_num_tokens
        self.kv_tokens = kv_tokens
        self.method = method
        self._perm = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_token_mask(cls, layout: VideoLayout, keep: torch.Tensor, method: str = "custom") -> "TokenPlan":
        """The plan computing exactly the key tokens where ``keep`` (bool ``(B, H, NB, L)``, original
        token order on the last dim) is True for query block ``m``."""
        if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or keep.dim() != 4:
            raise TypeError(f"Expect keep to be a bool tensor (B, H, NB, L) but got {_describe(keep)}")
        nb, L = layout.num_blocks, layout.num_tokens
        if keep.shape[-2:] != (nb, L):
            raise ValueError(f"Expect keep of shape (B, H, {nb}, {L}) but got {tuple(keep.shape)}")
        return cls(layout, *_dense_to_csr(keep), method)

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
        return tuple(self.kv_num_tokens.shape[:2])

    @property
    def max_tokens(self) -> int:
        return self.kv_tokens.shape[-1]

    @property
    def device(self) -> torch.device:
        return self.kv_num_tokens.device

    @property
    def perm(self) -> torch.Tensor:
        """int64 ``(NB * block_size,)`` on the plan's device: ``layout.perm`` (query rows of each block)."""
        if self._perm is None:
            self._perm = self.layout.perm.to(self.device)
        return self._perm

    def _kept_valid(self) -> tuple[torch.Tensor, torch.Tensor]:
        valid = torch.arange(self.max_tokens, device=self.device) < self.kv_num_tokens.unsqueeze(-1)
        return self.kv_tokens.long().clamp(0, self.layout.num_tokens - 1), valid

    @property
    def density(self) -> float:
        """Fraction of the real ``L x L`` score entries that are computed, averaged over batch and heads."""
        return float(self.density_per_head().mean())

    def density_per_head(self) -> torch.Tensor:
        """float64 ``(B, H)``: the computed fraction of real score entries of each batch element and head."""
        rows = self.layout.block_tokens.to(self.device, torch.float64)
        entries = self.kv_num_tokens.double() * rows  # (B, H, NB)
        return entries.sum(-1) / float(self.layout.num_tokens) ** 2

    # ------------------------------------------------------------------ conversions
    def to_dense(self) -> torch.Tensor:
        """bool ``(B, H, NB, L)``: True where query block ``m`` computes key token ``j`` (original order)."""
        idx, valid = self._kept_valid()
        hits = torch.zeros(*self.kv_num_tokens.shape, self.layout.num_tokens, dtype=torch.int32, device=self.device)
        # scatter_add, not scatter: the unspecified tail may repeat a kept index and must not erase it.
        return hits.scatter_add_(-1, idx, valid.to(torch.int32)) > 0

    def to_mask(self) -> torch.Tensor:
        """bool ``(B, H, L, L)`` in the original token order; True = score computed. For small ``L`` (tests)."""
        slot_block = self.layout.inverse_perm.to(self.device) // self.block_size  # (L,)
        return self.to_dense()[:, :, slot_block]

    # ------------------------------------------------------------------ checks
    def validate(self) -> "TokenPlan":
        """Check the invariants in the class docstring; raise ``ValueError`` naming the first broken one."""
        L = self.layout.num_tokens
        counts = self.kv_num_tokens
        if bool((counts < 1).any()) or bool((counts > L).any()):
            raise ValueError(f"Expect 1 <= kv_num_tokens <= {L} but got values in [{int(counts.min())}, {int(counts.max())}]")
        if int(counts.max()) > self.max_tokens:
            raise ValueError(f"Expect kv_num_tokens <= max_tokens={self.max_tokens} but got {int(counts.max())}")
        valid = torch.arange(self.max_tokens, device=self.device) < counts.unsqueeze(-1)
        idx = self.kv_tokens.long()
        if bool(((idx < 0) | (idx >= L))[valid].any()):
            raise ValueError(f"Expect kv_tokens in [0, {L}) but found out-of-range entries")
        step = idx[..., 1:] - idx[..., :-1]
        if bool((step <= 0)[valid[..., 1:]].any()):
            raise ValueError("Expect kv_tokens strictly ascending (sorted, no duplicates) within kv_num_tokens")
        dense = self.to_dense()  # (B, H, NB, L)
        own = _own_tokens(self.layout, self.device)  # (NB, L)
        if bool((own & ~dense).any()):
            raise ValueError("Expect every query block to keep all tokens of its own block but some do not")
        text_tok = _text_tokens(self.layout, self.device)
        text_blk = self.layout.is_text_block.to(self.device)
        if bool(text_tok.any()) and not (bool(dense[..., text_tok].all()) and bool(dense[..., text_blk, :].all())):
            raise ValueError("Expect text tokens attended densely in both directions but some text pairs are dropped")
        return self

    # ------------------------------------------------------------------ FlexAttention-style conveniences
    def __getitem__(self, index) -> "TokenPlan":
        """Slice batch and heads: ``plan[b]``, ``plan[:, h]`` (integer indices keep the dimension)."""
        if not isinstance(index, tuple):
            index = (index,)
        if len(index) > 2:
            raise IndexError(f"Expect at most 2 indices (batch, head) but got {len(index)}")
        index = tuple(slice(i, i + 1) if isinstance(i, int) else i for i in index)
        return TokenPlan(self.layout, self.kv_num_tokens[index], self.kv_tokens[index], self.method)

    def to(self, device) -> "TokenPlan":
        return TokenPlan(self.layout, self.kv_num_tokens.to(device), self.kv_tokens.to(device), self.method)

    def to_string(self, grid_size: int = 20, limit: int = 4) -> str:
        """ASCII picture of each (batch, head) plan as a query-block x key-block grid shrunk to
        ``grid_size``: █ every key token of the cell kept, ░ some, blank none."""
        dense = self.to_dense()
        B, H, nb, L = dense.shape
        key_block = (self.layout.inverse_perm.to(self.device) // self.block_size)  # (L,)
        per_block = torch.zeros(B, H, nb, nb, device=self.device).index_add_(-1, key_block, dense.float())
        frac = per_block / self.layout.block_tokens.to(self.device, torch.float32)
        cells = min(grid_size, nb)
        pooled = torch.nn.functional.adaptive_avg_pool2d(frac.reshape(B * H, 1, nb, nb), cells).reshape(B, H, cells, cells)
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
            f"TokenPlan(method={self.method!r}, shape={self.shape}, num_blocks={self.num_blocks}, "
            f"block_size={self.block_size}, max_tokens={self.max_tokens}, density={self.density:.2%}, "
            f"kv_num_tokens={tuple(self.kv_num_tokens.shape)}, kv_tokens={tuple(self.kv_tokens.shape)}, "
            f"device={self.device})"
        )

    def __str__(self) -> str:
        return f"{self!r}\n{self.to_string()}"


def _own_tokens(layout: VideoLayout, device) -> torch.Tensor:
    """bool ``(NB, L)``: the tokens of each block (original order)."""
    block_of_token = layout.inverse_perm.to(device) // layout.block_size
    return block_of_token[None, :] == torch.arange(layout.num_blocks, device=device)[:, None]


def _text_tokens(layout: VideoLayout, device) -> torch.Tensor:
    """bool ``(L,)``: True for text tokens."""
    block_of_token = layout.inverse_perm.to(device) // layout.block_size
    return layout.is_text_block.to(device)[block_of_token]
