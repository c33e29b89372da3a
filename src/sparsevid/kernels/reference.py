"""Block-sparse attention in plain PyTorch: the CPU path and the oracle twin of the Triton kernel.

Same contract as the Triton launcher: inputs are already validated, the plan broadcasts to q's
batch and heads, and only kept blocks are computed. Query blocks are processed in chunks whose
gathered keys stay under a memory budget, so memory is O(L x kept), never O(L x L).
:func:`sparse_attention_reference_tokens` is the same computation for a ``TokenPlan`` (kept key
*tokens* per query block, the gather kernel's twin); both feed one chunked core, ``_attend``.
"""

from __future__ import annotations

import torch

# Gathered key/value elements per chunk (float32): about 64 MiB each for k and v.
_CHUNK_ELEMENTS = 1 << 24


def sparse_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    perm: torch.Tensor,
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """Attention of q over the kept key blocks, computed in float32, returned in q's dtype.

    Args:
        q, k, v (Tensor): ``(B, H, L, D)``, any strides, one dtype and device.
        perm (Tensor): int64 ``(NB * block_size,)``, original token of each tile-order slot, -1 padding.
        kv_num_blocks (Tensor): int32 ``(B or 1, H or 1, NB)``.
        kv_indices (Tensor): int32 ``(B or 1, H or 1, NB, max_kept)``.
        block_size (int): slots per block.
        scale (float): softmax scale.

    Returns:
        Tensor ``(B, H, L, D)`` contiguous, original token order.
    """
    B, H = q.shape[:2]
    nb = perm.numel() // block_size
    slots = perm.view(nb, block_size)
    kv_num_blocks = kv_num_blocks.expand(B, H, nb)
    # Gather only as many key blocks as the longest row keeps (plans may carry a wider tail).
    kept_max = max(1, min(kv_indices.shape[-1], int(kv_num_blocks.max())))
    kv_indices = kv_indices[..., :kept_max].expand(B, H, nb, kept_max)
    arange_kept = torch.arange(kept_max, device=q.device)

    def keys(m0: int, m1: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = kv_indices[:, :, m0:m1].long()  # (B, H, c, K)
        kept = arange_kept < kv_num_blocks[:, :, m0:m1, None]
        k_tok = slots[idx.clamp(0, nb - 1)]  # (B, H, c, K, bs)
        valid = kept[..., None] & (k_tok >= 0)
        return k_tok.flatten(-2), valid.flatten(-2)

    return _attend(q, k, v, slots, keys, kept_max * block_size, scale)


def sparse_attention_reference_tokens(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    perm: torch.Tensor,
    kv_num_tokens: torch.Tensor,
    kv_tokens: torch.Tensor,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """The token-plan (M x 1) twin of :func:`sparse_attention_reference`, oracle of the gather kernel.

    Args:
        q, k, v, perm, block_size, scale: as :func:`sparse_attention_reference`.
        kv_num_tokens (Tensor): int32 ``(B or 1, H or 1, NB)``: kept key tokens per query block.
        kv_tokens (Tensor): int32 ``(B or 1, H or 1, NB, max_tokens)``: their original indices.

    Returns:
        Tensor ``(B, H, L, D)`` contiguous, original token order.
    """
    B, H = q.shape[:2]
    nb = perm.numel() // block_size
    kv_num_tokens = kv_num_tokens.expand(B, H, nb)
    kv_tokens = kv_tokens.expand(B, H, nb, kv_tokens.shape[-1])
    width = kv_tokens.shape[-1]
    arange_kept = torch.arange(width, device=q.device)

    def keys(m0: int, m1: int) -> tuple[torch.Tensor, torch.Tensor]:
        return kv_tokens[:, :, m0:m1].long(), arange_kept < kv_num_tokens[:, :, m0:m1, None]

    return _attend(q, k, v, perm.view(nb, block_size), keys, width, scale)


def _attend(q, k, v, slots, keys, width, scale):
    """Chunks of query blocks against their gathered keys: the one computation of both twins.

    ``keys(m0, m1)`` gives, for query blocks ``m0..m1``, the original key tokens ``(B, H, c, width)``
    (any value where invalid) and their validity ``(B, H, c, width)``.
    """
    B, H, L, D = q.shape
    nb, block_size = slots.shape
    out = torch.empty(B, H, L, D, dtype=q.dtype, device=q.device)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, B * H * width * D))
    for m0 in range(0, nb, chunk):
        m1 = min(nb, m0 + chunk)
        c = m1 - m0
        q_tok = slots[m0:m1].reshape(-1)  # (c * bs,)
        q_real = q_tok >= 0
        qg = q[:, :, q_tok.clamp(min=0)].float().view(B, H, c, block_size, D)

        k_tok, valid = keys(m0, m1)  # (B, H, c, width)
        gather = k_tok.clamp(0, L - 1).reshape(B, H, -1, 1).expand(-1, -1, -1, D)
        kg = k.gather(2, gather).float().view(B, H, c, width, D)
        vg = v.gather(2, gather).float().view(B, H, c, width, D)

        scores = torch.matmul(qg, kg.transpose(-1, -2)) * scale  # (B, H, c, bs, width)
        scores = scores.masked_fill(~valid.view(B, H, c, 1, width), float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        og = torch.matmul(probs, vg).view(B, H, c * block_size, D)
        out[:, :, q_tok[q_real]] = og[:, :, q_real].to(q.dtype)
    return out
