"""Block-sparse attention in plain PyTorch: the CPU path, the autograd path and the oracle twin of
the Triton kernels.

Same contract as the Triton launchers: inputs are already validated, the plan broadcasts to q's
batch and heads, and only kept blocks are computed. Query blocks are grouped by how many keys they
keep (so one dense text row does not make every chunk gather every key) and processed in chunks
whose gathered keys stay under a memory budget: memory is O(L x kept), never O(L x L).
:func:`sparse_attention_reference_tokens` is the same computation for a ``TokenPlan`` (kept key
*tokens* per query block, the gather kernel's twin); both feed one chunked core, ``_attend``.
Everything is differentiable (gathers, matmuls, softmax), so this backend also trains.
"""

from __future__ import annotations

import torch

from ..backends import register_backend
from ..cluster_plan import ClusterPlan, cluster_means
from ..plan import BlockPlan
from ..tail import TailSummaries, decide_cluster_tail, summarize_reference, tail_logits, tail_operands
from ..token_plan import TokenPlan

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
    probs_fn=None,
    tail: TailSummaries | None = None,
    kept: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    key_perm: torch.Tensor | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of q over the kept key blocks, computed in float32, returned in q's dtype.

    Args:
        q, k, v (Tensor): ``(B, H, L, D)``, any strides, one dtype and device (with ``key_perm``, k
            and v may have another length ``Lk``).
        perm (Tensor): int64 ``(NB * block_size,)``, original token of each tile-order slot, -1 missing.
        kv_num_blocks (Tensor): int32 ``(B or 1, H or 1, NB)``.
        kv_indices (Tensor): int32 ``(B or 1, H or 1, NB, max_kept)``: indices of key blocks (of
            ``key_perm``'s blocks when given).
        block_size (int): slots per block.
        scale (float): softmax scale.
        probs_fn (callable | None): ``scores -> probabilities`` (default ``softmax``); the
            quantization reference rounds P with it.
        tail (TailSummaries | None): summaries of k and v (:mod:`sparsevid.tail`): each query row's
            skipped key groups join its softmax as one term each; ``None`` drops them.
        kept (Tensor | None): with ``tail``, bool ``(B or 1, H or 1, NB, NS // per_block)``, the plan as a
            block mask (``plan.to_dense()``): which key blocks' groups are computed exactly, not summarised.
        gate (Tensor | None): with ``tail``, float32 ``(B, H, 2)``, each head's decision on its summaries
            (:func:`sparsevid.tail.decide_tail`); ``None``: the summaries as they are.
        key_perm (Tensor | None): int64 ``(NBk * block_size,)``: the key token (an index into k) of each
            slot of the key blocks, -1 missing; ``None``: ``perm`` (self-attention). A ring step's query
            and key chunks (:mod:`sparsevid.parallel.ring`) have different tables.
        return_lse (bool): also return each row's natural-log log-sum-exp over its computed entries, and
            the output in float32: a partial that :func:`merge_partials` merges (a row
            that computes nothing gets zeros and ``-inf``).

    Returns:
        Tensor ``(B, H, L, D)`` contiguous, original token order; with ``return_lse`` ``(out, lse)``,
        float32 ``(B, H, L, D)`` and ``(B, H, L)``.
    """
    B, H = q.shape[:2]
    nb = perm.numel() // block_size
    slots = perm.view(nb, block_size)
    key_slots = slots if key_perm is None else key_perm.view(-1, block_size)
    counts = kv_num_blocks.expand(B, H, nb)
    kv_indices = kv_indices.expand(B, H, nb, kv_indices.shape[-1])

    def keys(blocks: torch.Tensor, kept: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = kv_indices[:, :, blocks, :kept].long()  # (B, H, c, kept)
        valid_block = torch.arange(kept, device=q.device) < counts[:, :, blocks, None]
        k_tok = key_slots[idx.clamp(0, key_slots.shape[0] - 1)]  # (B, H, c, kept, bs)
        valid = valid_block[..., None] & (k_tok >= 0)
        return k_tok.flatten(-2), valid.flatten(-2)

    if tail is not None:
        return _attend(q, k, v, slots, counts, keys, block_size, scale, return_lse=return_lse,
                       tail=_tail_terms(tail, kept.expand(B, H, nb, kept.shape[-1]), scale, gate))
    if probs_fn is None:
        return _attend(q, k, v, slots, counts, keys, block_size, scale, return_lse=return_lse)
    return _attend(q, k, v, slots, counts, keys, block_size, scale, probs_fn=probs_fn)


def _tail_terms(tail: TailSummaries, kept: torch.Tensor, scale: float, gate: torch.Tensor | None):
    """``terms(qg, blocks) -> (logits, values)`` for :func:`_attend`: the summary groups of the key blocks
    that query blocks ``blocks`` skip, as extra softmax columns (kept blocks' groups masked out)."""
    values = tail.values.float().unsqueeze(2)  # (B, H, 1, NS, D)

    def terms(qg, blocks):
        logits = tail_logits(qg, tail, scale, gate)  # (B, H, c, bs, NS)
        skipped = ~kept[:, :, blocks].repeat_interleave(tail.per_block, dim=-1)  # (B, H, c, NS)
        return logits.masked_fill(~skipped.unsqueeze(-2), float("-inf")), values

    return terms


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
        kv_num_tokens (Tensor): int32 ``(B or 1, H or 1, NB)``: kept key tokens per query block; a
            row that keeps all ``L`` tokens reads no index (the list may be narrower than ``L``).
        kv_tokens (Tensor): int32 ``(B or 1, H or 1, NB, max_tokens)``: their original indices.

    Returns:
        Tensor ``(B, H, L, D)`` contiguous, original token order.
    """
    B, H, L = q.shape[:3]
    nb = perm.numel() // block_size
    counts = kv_num_tokens.expand(B, H, nb)
    stored = kv_tokens.shape[-1]
    kv_tokens = kv_tokens.expand(B, H, nb, stored)

    def keys(blocks: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        arange = torch.arange(width, device=q.device)
        listed = kv_tokens[:, :, blocks, : min(width, stored)].long()
        if width > stored:  # only dense rows reach past the stored width
            listed = torch.nn.functional.pad(listed, (0, width - stored))
        n = counts[:, :, blocks, None]
        return torch.where(n == L, arange, listed), arange < n

    return _attend(q, k, v, perm.view(nb, block_size), counts, keys, 1, scale)


def _attend(q, k, v, slots, counts, keys, key_unit, scale, probs_fn=None, tail=None, return_lse=False):
    """Chunks of query blocks against their gathered keys: the one computation of all twins.

    ``counts`` ``(B, H, NB)``: kept keys of each query block, in units of ``key_unit`` tokens.
    ``keys(blocks, n)`` gives, for the query blocks ``blocks``, the original key tokens
    ``(B, H, c, n * key_unit)`` (any value where invalid) and their validity.
    ``probs_fn(scores)``: the probabilities multiplied with v (default ``softmax``; the quantization
    reference rounds them as its kernel does).
    ``tail(qg, blocks) -> (logits (B, H, c, bs, NS), values (B, H, 1, NS, D))``: summary terms that join
    the same softmax (:func:`_tail_terms`); ``None`` drops the skipped keys.
    ``return_lse``: ``(out, lse)`` in float32, rows without a computed entry zero with ``-inf``.
    """
    B, H, L, D = q.shape
    Lk = k.shape[2]
    nb, block_size = slots.shape
    out = torch.empty(B, H, L, D, dtype=torch.float32 if return_lse else q.dtype, device=q.device)
    lse = torch.empty(B, H, L, dtype=torch.float32, device=q.device) if return_lse else None
    widest = counts.amax(dim=(0, 1)).clamp(min=1)  # (NB,): the chunk width a query block needs
    order = widest.argsort()
    widths = widest[order].tolist()  # one host read: the reference is the CPU/oracle path
    m0 = 0
    while m0 < nb:
        # grow the chunk while it fits the budget at the width of its widest (= last) block, and while
        # that width is at most twice its narrowest: no block gathers more than twice what it keeps
        m1 = m0 + 1
        while (m1 < nb and widths[m1] <= 2 * widths[m0]
               and (m1 + 1 - m0) * B * H * widths[m1] * key_unit * D <= _CHUNK_ELEMENTS):
            m1 += 1
        width = widths[m1 - 1]
        blocks = order[m0:m1]
        c = m1 - m0
        q_tok = slots[blocks].reshape(-1)  # (c * bs,)
        q_real = q_tok >= 0
        qg = q[:, :, q_tok.clamp(min=0)].float().view(B, H, c, block_size, D)

        k_tok, valid = keys(blocks, width)  # (B, H, c, width * key_unit)
        n = k_tok.shape[-1]
        gather = k_tok.clamp(0, Lk - 1).reshape(B, H, -1, 1).expand(-1, -1, -1, D)
        kg = k.gather(2, gather).float().view(B, H, c, n, D)
        vg = v.gather(2, gather).float().view(B, H, c, n, D)

        scores = torch.matmul(qg, kg.transpose(-1, -2)) * scale  # (B, H, c, bs, n)
        scores = scores.masked_fill(~valid.view(B, H, c, 1, n), float("-inf"))
        if tail is not None:  # one softmax over the exact keys and the summary terms
            tail_scores, tail_values = tail(qg, blocks)
            scores = torch.cat([scores, tail_scores], dim=-1)
        if return_lse:  # rows with nothing computed: lse -inf, probabilities exp(-inf) = 0
            row_lse = torch.logsumexp(scores, dim=-1)
            probs = torch.exp(scores - row_lse.masked_fill(row_lse == float("-inf"), 0.0).unsqueeze(-1))
            lse[:, :, q_tok[q_real]] = row_lse.reshape(B, H, c * block_size)[:, :, q_real]
        else:
            probs = torch.softmax(scores, dim=-1) if probs_fn is None else probs_fn(scores)
        og = torch.matmul(probs[..., :n], vg)
        if tail is not None:
            og = og + torch.matmul(probs[..., n:], tail_values)
        out[:, :, q_tok[q_real]] = og.view(B, H, c * block_size, D)[:, :, q_real].to(out.dtype)
        m0 = m1
    return (out, lse) if return_lse else out


def merge_partials(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                   lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two partial attentions over disjoint keys -> the attention over both (flash-decoding's combine):
    ``lse = logaddexp(lse_a, lse_b)``, ``out = exp(lse_a - lse) out_a + exp(lse_b - lse) out_b``.

    ``out_*`` float32 ``(..., D)``, ``lse_*`` float32 ``(...)``; a row empty in both stays zero with ``-inf``.
    """
    lse = torch.logaddexp(lse_a, lse_b)
    base = lse.masked_fill(lse == float("-inf"), 0.0)  # empty rows: exp(-inf - 0) = 0, not nan
    out = torch.exp(lse_a - base).unsqueeze(-1) * out_a + torch.exp(lse_b - base).unsqueeze(-1) * out_b
    return out, lse


def _ring_step(q, k, v, perm, kv_num_blocks, kv_indices, block_size, scale, *, tail, kept, gate, key_perm):
    return sparse_attention_reference(q, k, v, perm, kv_num_blocks, kv_indices, block_size, scale, tail=tail,
                                      kept=kept, gate=gate, key_perm=key_perm, return_lse=True)


@register_backend(
    "reference", plans=(BlockPlan, TokenPlan, ClusterPlan), devices=("cpu", "cuda", "mps", "xpu"), backward=True,
    priority=0, auto_devices=("cpu", "cuda", "mps", "xpu"), summarize=summarize_reference, ring_step=_ring_step,
    description="pure PyTorch, float32 math, chunked: any device, autograd, the oracle of the kernels",
)
def _reference_backend(q, k, v, plan, scale, tail=None):
    if isinstance(plan, ClusterPlan):
        from .reference_cluster import sparse_attention_reference_clusters  # it builds on this module's core

        if tail is None:
            return sparse_attention_reference_clusters(q, k, v, plan, scale)
        means = cluster_means(k, plan), cluster_means(v, plan)  # built once: the decision and the tail read them
        gate = decide_cluster_tail(q, k, v, plan, scale, tail.probes, means)
        return sparse_attention_reference_clusters(q, k, v, plan, scale, gate, means)
    if isinstance(plan, TokenPlan):
        return sparse_attention_reference_tokens(
            q, k, v, plan.perm, plan.kv_num_tokens, plan.kv_tokens, plan.block_size, scale
        )
    if tail is None:
        return sparse_attention_reference(q, k, v, plan.perm, plan.kv_num_blocks, plan.kv_indices, plan.block_size,
                                          scale)
    summaries, kept, gate = tail_operands(summarize_reference, q, k, v, plan, tail, scale)
    return sparse_attention_reference(q, k, v, plan.perm, plan.kv_num_blocks, plan.kv_indices, plan.block_size, scale,
                                      tail=summaries, kept=kept, gate=gate)
