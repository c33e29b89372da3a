"""Block-sparse attention in plain PyTorch: the CPU path and the oracle twin of the Triton kernel.

Same contract as the Triton launcher: inputs are already validated, the plan broadcasts to q's
batch and heads, and only kept blocks are computed. Query blocks are processed in chunks whose
gathered keys stay under a memory budget, so memory is O(L x kept), never O(L x L).
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
    B, H, L, D = q.shape
    nb = perm.numel() // block_size
    slots = perm.view(nb, block_size)
    kv_num_blocks = kv_num_blocks.expand(B, H, nb)
    kv_indices = kv_indices.expand(B, H, nb, kv_indices.shape[-1])
    kept_max = kv_indices.shape[-1]
    out = torch.empty(B, H, L, D, dtype=q.dtype, device=q.device)
    arange_kept = torch.arange(kept_max, device=q.device)

    chunk = max(1, _CHUNK_ELEMENTS // max(1, B * H * kept_max * block_size * D))
    for m0 in range(0, nb, chunk):
        m1 = min(nb, m0 + chunk)
        c = m1 - m0
        q_tok = slots[m0:m1].reshape(-1)  # (c * bs,)
        q_real = q_tok >= 0
        qg = q[:, :, q_tok.clamp(min=0)].float().view(B, H, c, block_size, D)

        idx = kv_indices[:, :, m0:m1].long()  # (B, H, c, K)
        kept = arange_kept < kv_num_blocks[:, :, m0:m1, None]
        k_tok = slots[idx.clamp(0, nb - 1)]  # (B, H, c, K, bs)
        k_valid = (kept[..., None] & (k_tok >= 0)).view(B, H, c, 1, kept_max * block_size)
        gather = k_tok.clamp(min=0).view(B, H, -1, 1).expand(-1, -1, -1, D)
        kg = k.gather(2, gather).float().view(B, H, c, kept_max * block_size, D)
        vg = v.gather(2, gather).float().view(B, H, c, kept_max * block_size, D)

        scores = torch.matmul(qg, kg.transpose(-1, -2)) * scale  # (B, H, c, bs, K * bs)
        scores = scores.masked_fill(~k_valid, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        og = torch.matmul(probs, vg).view(B, H, c * block_size, D)
        out[:, :, q_tok[q_real]] = og[:, :, q_real].to(q.dtype)
    return out
