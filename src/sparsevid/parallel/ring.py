"""Ring context parallelism with block plans: one plan split over the ring's sequence chunks, the
steps that keep nothing skipped, the steps' partial results merged by their log-sum-exp.

Under ring attention (diffusers' ``ContextParallelConfig(ring_degree=R)``) rank ``r`` holds the
sequence chunk ``[r*C, (r+1)*C)`` of q, k and v (``C = L / R``; diffusers splits by position, in the
model's token order, which is raster order under context parallelism), and ring step ``i`` brings
rank ``(r + i) % R``'s key chunk. Each step is a partial attention over disjoint keys; the partials
merge exactly as flash-decoding's split-KV combine (:func:`merge_partials`).

**The plan** is the one-GPU plan: computed on the whole sequence (the ring ranks gather q and k,
see :func:`gather_sequence`), by the same planner call, so it is the same plan bit for bit for every
planner (draft pools whole blocks, xattn samples antidiagonals at full resolution) and the ranks
need not agree on anything else. Planning per chunk would be cheaper but gives another plan: a
block's pooled q/k would mix chunks, and per-chunk budgets are not the one-GPU budget.

**Token order.** Chunks are ranges of sequence positions; blocks are runs of tile-order slots, so
a block's tokens can lie in two chunks (a chunk boundary inside a frame cuts the tiles of one tile
row). Plans are expressed on the chunks' tokens (:func:`chunk_tables`): chunk ``c`` lists the
blocks with a token in it and, for each of their slots, a token's index inside the chunk (each
block's tokens of the chunk first, then ``-1``: neither the order of the keys in a softmax nor that
of independent query rows changes anything, and the kernels mask padding at a block's end). Step
``(r, j)`` keeps, for each query block of chunk ``r``, the plan's kept key blocks that have tokens
in chunk ``j``, as CSR over chunk ``j``'s blocks (:func:`ring_steps`). No token is computed twice;
the cost is the tables (``O(NB * block_size)`` integers per chunk, once per layout) and, at each
chunk boundary, a few blocks computed as two partly empty ones (Wan2.1-14B 720p, auto tiles 9x14:
5-6 of 591 blocks per boundary; Wan2.1-1.3B 480p, 30x4 strips: 12 of 256).

**Skipping.** Step ``(r, j)`` runs only where some query block of chunk ``r`` keeps a key block
with tokens in chunk ``j`` (any batch element or head): a skipped step computes nothing. The own
chunk's step always runs (every query block keeps its own block). diffusers 0.42.1 rotates the
chunks with one all-gather before the first step (its only ``rotate_method``), and so does this
module: there is no per-step transfer to skip, so skipping saves compute, not communication.

**The tail** (``tail=``, :mod:`sparsevid.tail`): the summaries are the whole sequence's (from the
gathered k and v, the one-GPU summaries), and each query row's summary terms join the softmax of its
own chunk's step, the one never skipped: every skipped block's term is counted once, whichever
chunks its tokens lie in, and the merge makes the result the one-GPU tail output for a tail taken as it
is (``TailMethod.fixed()``). How much of the tail a (batch, head) takes (:func:`~sparsevid.tail.decide_tail`)
each rank decides from probe rows of its own chunk (it holds every key and value): it may differ from the
one-GPU call's decision, which samples the whole sequence.

A step is one launch of a block-sparse kernel with the query chunk's and the key chunk's tables and a
log-sum-exp output: the ``ring_step`` a backend declares at registration (``sparsevid.register_backend``;
:data:`RING_BACKENDS` lists them: the Triton kernel on CUDA, its PyTorch twin elsewhere; FlashAttention-4
reads contiguous tile-order rows, so it cannot take a chunk's partly empty blocks). The registry chooses the
backend (``resolve_backend(..., needs=("ring",))``) and the backend's declared summary builder makes the tail.

Shape legend: ``B`` batch, ``H`` heads, ``L`` tokens, ``C = L / R`` tokens per chunk, ``D`` head dim,
``R`` ring degree (chunks), ``NB`` blocks, ``n_c`` blocks with a token in chunk ``c``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..backends import _registry, resolve_backend
from ..kernels.csr import dense_to_csr
from ..kernels.reference import merge_partials  # the steps' combine (the tail's decision uses it too)
from ..layout import VideoLayout
from ..plan import BlockPlan
from ..tail import check_tail, kept_blocks, tail_operands

__all__ = ["RING_BACKENDS", "ChunkTable", "RingGroup", "RingSteps", "all_gather", "chunk_tables", "gather_sequence",
           "merge_partials", "needed_steps", "ring_backend", "ring_rank_attention", "ring_steps", "simulate_ring"]


def __getattr__(name: str):
    if name == "RING_BACKENDS":  # the backends with a ring step, read from the registry (a registration may add one)
        return tuple(s.name for s in _registry().values() if s.ring)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class ChunkTable:
    """One chunk's view of a layout's blocks.

    Attributes:
        blocks (Tensor): int64 ``(n_c,)``: the blocks with a token in the chunk, ascending.
        slots (Tensor): int64 ``(n_c * block_size,)``: for each slot of those blocks, a token's index
            inside the chunk: each block's tokens in the chunk first (in tile order), then ``-1``.
    """

    blocks: torch.Tensor
    slots: torch.Tensor


_TABLES: dict[tuple, list[ChunkTable]] = {}
_MAX_TABLES = 16  # one entry per (layout, chunks, device) in use; a few at most


def chunk_tables(layout: VideoLayout, chunks: int, device) -> list[ChunkTable]:
    """The :class:`ChunkTable` of each of ``chunks`` equal position ranges of ``layout``'s sequence."""
    L = layout.num_tokens
    if not isinstance(chunks, int) or isinstance(chunks, bool) or chunks < 1 or L % chunks:
        raise ValueError(f"Expect chunks to be an int >= 1 dividing the {L} tokens of the layout but got {chunks!r} "
                         "(diffusers' ring attention splits the sequence into equal chunks)")
    key = (layout, chunks, str(torch.device(device)))
    if key not in _TABLES:
        if len(_TABLES) >= _MAX_TABLES:
            _TABLES.pop(next(iter(_TABLES)))
        size = L // chunks
        slots = layout.on(device).perm.view(layout.num_blocks, layout.block_size)
        chunk = torch.where(slots >= 0, slots // size, -1)
        tables = []
        for c in range(chunks):
            inside = chunk == c
            blocks = inside.any(-1).nonzero().flatten()
            local = torch.where(inside, slots - c * size, -1)[blocks]
            first = (~inside[blocks]).to(torch.uint8).argsort(dim=-1, stable=True)  # the chunk's tokens first
            tables.append(ChunkTable(blocks, local.gather(-1, first).flatten()))
        _TABLES[key] = tables
    return _TABLES[key]


@dataclass(frozen=True)
class RingSteps:
    """Ring rank ``rank``'s share of a ``BlockPlan`` split over ``chunks`` ring ranks: for each key chunk ``j``, the
    CSR ``(kv_num_blocks, kv_indices)`` of the step against chunk ``j`` (or ``None``), see :func:`ring_steps`.
    The launch struct of a ring step, built once per plan by :meth:`build` (``plan.launch(RingSteps, chunks,
    rank)``: one host read, which steps run)."""

    plan_type: ClassVar[type] = BlockPlan
    steps: tuple

    @classmethod
    def build(cls, plan: BlockPlan, chunks: int, rank: int) -> "RingSteps":
        tables = chunk_tables(plan.layout, chunks, plan.device)
        rows = kept_blocks(plan)[:, :, tables[rank].blocks]  # (B, H, n_rank, NB)
        steps = [rows[..., t.blocks] for t in tables]  # (B, H, n_rank, n_j)
        needed = torch.stack([s.any() for s in steps]).tolist()
        return cls(tuple(dense_to_csr(s, width=s.shape[-1]) if keep else None for s, keep in zip(steps, needed)))


def ring_steps(plan: BlockPlan, chunks: int, rank: int) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    """Ring rank ``rank``'s share of ``plan``: for each key chunk ``j``, the CSR ``(kv_num_blocks, kv_indices)``
    (int32 ``(B or 1, H or 1, n_rank)`` and ``(..., n_rank, n_j)``, indices into chunk ``j``'s blocks) of the step
    against chunk ``j``, or ``None`` where the step keeps nothing.

    Kept with the plan (:class:`RingSteps`; one host read when first built: which steps run)."""
    return list(plan.launch(RingSteps, chunks, rank).steps)


def needed_steps(plan: BlockPlan, chunks: int) -> torch.Tensor:
    """bool ``(R, R)``: ``[r, j]`` is True where ring rank ``r``'s step against chunk ``j`` computes something."""
    return torch.tensor([[step is not None for step in ring_steps(plan, chunks, r)] for r in range(chunks)])


def ring_backend(backend: str, q: torch.Tensor, plan: BlockPlan, tail=None) -> str:
    """The backend that runs the ring steps of ``q`` (a rank's chunk) with ``plan``: the registry's choice among
    the backends with a ring step (:data:`RING_BACKENDS`), named or ``"auto"``.

    Raises:
        NotImplementedError: a backend without a ring step (``fa4``, the 8-bit ones).
        ValueError / TypeError: a named ring backend that cannot run these inputs.
    """
    return resolve_backend(backend, q, plan, tail=check_tail(tail, plan), needs=("ring",)).name


def ring_rank_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: BlockPlan, rank: int,
                        chunks: int, scale: float, tail=None, backend: str = "auto") -> tuple[torch.Tensor, list[int]]:
    """Ring rank ``rank``'s rows of ``sparse_attention(q_full, k, v, plan, tail=tail)``.

    Args:
        q (Tensor): ``(B, H, C, D)``, the rank's chunk of the queries.
        k, v (Tensor): ``(B, H, L, D)``, the whole sequence (every rank's chunk, e.g. from
            :func:`gather_sequence`); step ``j`` reads chunk ``j``.
        plan (BlockPlan): the one-GPU plan of the whole sequence.
        rank (int), chunks (int): this rank and the ring degree ``R``.
        scale (float): softmax scale.
        tail (str | TailMethod | None): see ``sparse_attention``.
        backend (str): what runs the steps (:func:`ring_backend`).

    Returns:
        ``(out, steps)``: ``out`` ``(B, H, C, D)`` in q's dtype; ``steps``: the chunks whose step ran,
        in ring order (rank, rank + 1, ...).
    """
    method = check_tail(tail, plan)
    spec = resolve_backend(backend, q, plan, tail=method, needs=("ring",))
    B, H, size = q.shape[:3]
    tables = chunk_tables(plan.layout, chunks, q.device)
    steps = ring_steps(plan, chunks, rank)
    summaries = kept = gate = None
    if method is not None:
        summaries, kept, gate = tail_operands(spec.summarize, q, k, v, plan, method, scale, offset=rank * size)
        kept = kept[:, :, tables[rank].blocks]  # the rank's query blocks
    out = lse = None
    ran = []
    for i in range(chunks):
        j = (rank + i) % chunks
        if steps[j] is None:  # never the own step (every query block keeps its own block): the tail rides on it
            continue
        own = j == rank
        counts, indices = (t.expand(B, H, *t.shape[2:]) for t in steps[j])
        chunk = slice(j * size, (j + 1) * size)
        part = spec.ring_step(q, k[:, :, chunk], v[:, :, chunk], tables[rank].slots, counts, indices, plan.block_size,
                              scale, tail=summaries if own else None, kept=kept if own else None, gate=gate,
                              key_perm=tables[j].slots)
        out, lse = part if out is None else merge_partials(out, lse, *part)
        ran.append(j)
    return out.to(q.dtype), ran


def simulate_ring(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: BlockPlan, chunks: int, *,
                  scale: float | None = None, tail=None, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Ring attention of ``chunks`` ranks simulated in one process (each rank a chunk of the sequence).

    Args:
        q, k, v (Tensor): ``(B, H, L, D)``, the whole sequence.
        plan (BlockPlan): a plan of ``q``, ``k`` (``plan.layout.num_tokens == L``, ``L % chunks == 0``).
        chunks (int): the ring degree ``R``.
        scale (float | None): softmax scale, default ``1 / sqrt(D)``.
        tail (str | None): see ``sparse_attention``.
        backend (str): what runs the steps (:func:`ring_backend`).

    Returns:
        ``(out, ran)``: ``out`` ``(B, H, L, D)``, equal to ``sparse_attention(q, k, v, plan, tail=tail)``
        up to float rounding (the merge sums in another order); ``ran`` bool ``(R, R)``: the steps computed.
    """
    from ..attention import _check_inputs, check_scale

    _check_inputs(q, k, v, plan)
    if not isinstance(plan, BlockPlan):
        raise TypeError(f"Expect a BlockPlan but got a {type(plan).__name__} (NYI: token plans under ring attention)")
    scale = check_scale(scale, q.shape[-1])
    chunk_tables(plan.layout, chunks, q.device)  # checks that chunks divides L
    size = q.shape[2] // chunks
    outs, ran = [], torch.zeros(chunks, chunks, dtype=torch.bool)
    for r in range(chunks):
        out, steps = ring_rank_attention(q[:, :, r * size:(r + 1) * size], k, v, plan, r, chunks, scale, tail, backend)
        outs.append(out)
        ran[r, steps] = True
    return torch.cat(outs, dim=2), ran


@dataclass(frozen=True)
class RingGroup:
    """The ring a rank belongs to: its ``rank`` in it, the ring degree ``size``, and the
    ``torch.distributed`` process ``group`` (diffusers: ``ContextParallelConfig._ring_mesh.get_group()``)."""

    rank: int
    size: int
    group: object


def gather_sequence(tensors: tuple[torch.Tensor, ...], ring: RingGroup) -> list[torch.Tensor]:
    """Every rank's chunk ``(B, H, C, D)`` of each tensor -> the whole sequence ``(B, H, R*C, D)``, in one
    all-gather over the ring (what diffusers' ring template does with k and v before its first step)."""
    flat = torch.cat([t.contiguous().flatten() for t in tensors])
    gathered = all_gather(flat, ring.group, ring.size).view(ring.size, -1)
    out, offset = [], 0
    for t in tensors:
        B, H, C, D = t.shape
        part = gathered[:, offset:offset + t.numel()].reshape(ring.size, B, H, C, D)
        out.append(part.permute(1, 2, 0, 3, 4).reshape(B, H, ring.size * C, D))
        offset += t.numel()
    return out


def all_gather(x: torch.Tensor, group, size: int) -> torch.Tensor:
    """Every rank's 1-D ``x`` concatenated in rank order: ``(size * x.numel(),)``."""
    import torch.distributed as dist

    out = x.new_empty(size * x.numel())
    # all_gather_single is torch 2.13's name of all_gather_into_tensor (deprecated there)
    getattr(dist, "all_gather_single", dist.all_gather_into_tensor)(out, x.contiguous(), group=group)
    return out
