"""``TokenPlan``: M x 1 sparsity — per query block, the individual key *tokens* to compute.

The sibling of :class:`~sparsevid.plan.BlockPlan` for fine-grained planners (``finegrained``,
FG-Attn, arXiv 2509.16518): the query side is still cut into the layout's tile blocks of
``M = block_size`` rows, but each query block keeps its own list of key tokens instead of whole
key blocks. Data only: planners build it, the gather kernel consumes it.
"""

from __future__ import annotations

import torch

from .layout import VideoLayout
from .plan import _CSRPlan, _dense_to_csr, _describe

__all__ = ["TokenPlan"]


class TokenPlan(_CSRPlan):
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
      ``kv_num_tokens[b, h, m]`` entries; the tail is unspecified. A row that keeps all ``L`` tokens
      (a text block's) stores no list: ``max_tokens`` is bounded by the other rows, so one text
      token does not cost ``NB x L`` indices.

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
    :meth:`from_token_mask`; one built from tensors is validated once, before its first
    :func:`sparsevid.sparse_attention`.
    """

    _COUNTS, _INDICES, _WIDTH = "kv_num_tokens", "kv_tokens", "max_tokens"
    _IMPLICIT_FULL_ROWS = True

    layout: VideoLayout
    method: str

    @property
    def kv_num_tokens(self) -> torch.Tensor:
        """int32 ``(B, H, NB)``."""
        return self._counts

    @property
    def kv_tokens(self) -> torch.Tensor:
        """int32 ``(B, H, NB, max_tokens)``: original token indices."""
        return self._indices

    @property
    def max_tokens(self) -> int:
        return self._indices.shape[-1]

    @classmethod
    def from_token_mask(cls, layout: VideoLayout, keep: torch.Tensor, method: str = "custom") -> "TokenPlan":
        """The plan computing exactly the key tokens where ``keep`` (bool ``(B, H, NB, L)``, original
        token order on the last dim) is True for query block ``m``."""
        if not isinstance(layout, VideoLayout):
            raise TypeError(f"Expect layout to be a VideoLayout but got {type(layout).__name__}")
        if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or keep.dim() != 4:
            raise TypeError(f"Expect keep to be a bool tensor (B, H, NB, L) but got {_describe(keep)}")
        nb, L = layout.num_blocks, layout.num_tokens
        if keep.shape[-2:] != (nb, L):
            raise ValueError(f"Expect keep of shape (B, H, {nb}, {L}) but got {tuple(keep.shape)}")
        counts = keep.sum(-1)
        listed = counts[counts < L]  # rows keeping every token store no list (one host read)
        return cls(layout, *_dense_to_csr(keep, width=max(1, int(listed.max())) if listed.numel() else 1), method)

    @property
    def _num_keys(self) -> int:
        return self.layout.num_tokens

    def density_per_head(self) -> torch.Tensor:
        """float64 ``(B, H)``: the computed fraction of real score entries (every kept key is one token, so
        it is the counts times each block's real rows; no gather of the lists)."""
        rows = self.layout.on(self.device).block_tokens.double()
        return (self._counts.double() * rows).sum(-1) / float(self.layout.num_tokens) ** 2

    def _block_coverage(self) -> torch.Tensor:
        tables = self.layout.on(self.device)
        dense = self.to_dense().float()  # (B, H, NB, L)
        per_block = torch.zeros(*dense.shape[:3], self.num_blocks, device=self.device)
        return per_block.index_add_(-1, tables.block_of_token, dense) / tables.block_tokens.float()

    def to_mask(self) -> torch.Tensor:
        """bool ``(B, H, L, L)`` in the original token order; True = score computed. For small ``L`` (tests)."""
        return self.to_dense()[:, :, self.layout.on(self.device).block_of_token]


def _text_tokens(layout: VideoLayout, device) -> torch.Tensor:
    """bool ``(L,)``: True for text tokens."""
    tables = layout.on(device)
    return tables.is_text_block[tables.block_of_token]
