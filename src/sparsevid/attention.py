"""``sparse_attention``: execute a :class:`BlockPlan` (or an M x 1 :class:`TokenPlan`, or a
:class:`ClusterPlan`) on q, k, v — the one public entry to the kernels.

The public function validates everything that can be checked from metadata (no host sync, so it
stays cheap, ``torch.compile``-able and CUDA-graph capturable), then asks the backend registry
(:mod:`sparsevid.backends`) which backend runs the inputs. Backends assume valid inputs and never
decide sparsity.
"""

from __future__ import annotations

import math
import numbers

import torch

from .backends import Backend, available_backends, check_quant, describe_backends, resolve_backend
from .cluster_plan import ClusterPlan
from .plan import BlockPlan
from .tail import CLUSTER_TAIL, check_tail
from .token_plan import TokenPlan

__all__ = ["Backend", "available_backends", "describe_backends", "sparse_attention"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_inputs(q, k, v, plan) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"Expect {name} to be a torch.Tensor but got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"Expect {name} of shape (B, heads, L, D) (4-D) but got {t.dim()}-D shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"Expect {name}.dtype in float16, bfloat16, float32 but got {t.dtype}")
    if not isinstance(plan, (BlockPlan, TokenPlan, ClusterPlan)):
        raise TypeError(f"Expect plan to be a sparsevid.BlockPlan, TokenPlan or ClusterPlan but got {type(plan).__name__}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"Expect q, k, v of one dtype but got q={q.dtype}, k={k.dtype}, v={v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"Expect q, k, v on one device but got q={q.device}, k={k.device}, v={v.device}")
    if k.shape != v.shape:
        raise ValueError(f"Expect k and v of one shape but got k={tuple(k.shape)}, v={tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"Expect q and k with equal batch, heads and head dim (NYI: grouped-query attention) "
            f"but got q={tuple(q.shape)}, k={tuple(k.shape)}"
        )
    B, H, _, D = q.shape
    if B == 0 or H == 0 or D == 0:
        raise ValueError(f"Expect batch, heads and head_dim >= 1 but got q of shape {tuple(q.shape)}")
    L = plan.layout.num_tokens
    if q.shape[2] != L or k.shape[2] != L:
        raise ValueError(
            f"Expect sequence length L={L} (plan.layout.num_tokens, {plan.layout}) but got "
            f"q L={q.shape[2]}, k L={k.shape[2]}; build the layout from the token grid of these tensors"
        )
    pb, ph = plan.shape
    if pb not in (1, B) or ph not in (1, H):
        raise ValueError(f"Expect a plan for batch {B} (or 1) and heads {H} (or 1) but got plan.shape=({pb}, {ph})")
    if plan.device != q.device:
        raise ValueError(f"Expect plan on {q.device} like q but got {plan.device}; use plan.to(q.device)")


def check_scale(scale, head_dim: int) -> float:
    """The softmax scale as a float (default ``1 / sqrt(head_dim)``); any positive finite real number."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"Expect scale to be a positive finite float but got {scale!r}")
    return float(scale)


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: BlockPlan | TokenPlan | ClusterPlan,
    *,
    scale: float | None = None,
    backend: str | Backend = "auto",
    quant: str | None = None,
    tail: str | None = "auto",
) -> torch.Tensor:
    """Block-sparse attention ``softmax(q kᵀ · scale + plan mask) v``, in the original token order.

    Args:
        q (Tensor): ``(batch, heads, L, head_dim)``, any strides (a ``(batch, L, heads, head_dim)``
            tensor ``.transpose(1, 2)`` is read in place on the GPU path).
        k (Tensor): ``(batch, heads, L, head_dim)``.
        v (Tensor): ``(batch, heads, L, head_dim)``.
        plan (BlockPlan | TokenPlan | ClusterPlan): which blocks (for a ``TokenPlan``, which key tokens per
            query block; for a ``ClusterPlan``, which key clusters per query cluster) to compute;
            ``L == plan.layout.num_tokens``; its batch and heads equal q's or are 1 (broadcast).
        scale (float, optional): softmax scale, default ``1 / sqrt(head_dim)``.
        backend (str): ``"auto"`` (the fastest registered backend that supports the inputs: ``fa4``
            on Hopper/Blackwell when installed, ``triton`` on other CUDA GPUs, ``reference`` on the
            CPU and for inputs that require grad), or a name from :func:`describe_backends`.
        quant (str | None): ``None`` (exact attention), or 8-bit attention on the same plan:
            ``"int8"`` (smoothed INT8 Q·Kᵀ per block, fp16 P·V; ``triton-int8`` on CUDA sm80+,
            ``reference-int8`` on the CPU) or ``"fp8"`` (e4m3 Q·Kᵀ and P·V; ``triton-fp8`` on CUDA
            sm89+). Forward only. ``auto`` picks a quantized backend only when ``quant`` asks for one;
            a named quantized backend (``backend="triton-int8"``) runs its own quantization. The
            quantization and its error bounds: :mod:`sparsevid.kernels.reference_quant`.
        tail (str | None): what the keys the plan skips contribute. ``"auto"`` (default): the plan type's
            default, ``None`` for a ``BlockPlan`` or ``TokenPlan``, ``"centroid"`` for a ``ClusterPlan``.
            ``None``: nothing, the kept probabilities are renormalised. A summary method of
            :mod:`sparsevid.tail` (``"pooled-var"``, ``"pooled-var-32"``, a ``BlockPlan`` only) keeps each
            skipped block in the same softmax as summary terms of this call's k and v; ``"centroid"`` (a
            ``ClusterPlan`` only) keeps each key cluster a query's cluster drops as one term, logit
            ``scale * q . k_mean + log n``, value the cluster's mean value of this call's v. Either tail is
            weighted per (batch, head) by the call's decision from exact probe rows, never worse than dropping
            on them (a :class:`~sparsevid.tail.TailMethod`'s ``fixed()`` takes the terms as they are). Exact
            attention only (``quant=None``); backends that declare a tail pass (``auto`` picks among them).

    Returns:
        Tensor ``(batch, heads, L, head_dim)`` in q's dtype. With ``tail=None``, entries outside the plan
        get zero weight, exactly like ``scaled_dot_product_attention(q, k, v, attn_mask=plan.to_mask())``.

    Raises:
        TypeError / ValueError: naming the argument, before any kernel launch; a named backend that
        cannot run the inputs says what is missing. A plan not made by a planner (built by hand from
        tensors) is validated (:meth:`BlockPlan.validate`, host syncs) before its first launch, once;
        a planner's plan is never read on the host here. Values are not inspected: NaN in q or k
        propagates as in SDPA (planners reject it). NaN in a row of v reaches, with ``tail=None``, exactly
        the query rows whose plan computes that key (SDPA's dense mask would spread it to every row); with a
        tail, every row: the rows that skip its block read it through its group's mean value.
    """
    _check_inputs(q, k, v, plan)
    scale = check_scale(scale, q.shape[-1])
    quant = check_quant(quant)
    method = check_tail(tail, plan)
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if quant is not None and needs_grad:
        raise ValueError(f"Expect inputs without requires_grad with quant={quant!r} (8-bit attention is forward "
                         "only) but q, k or v requires grad; use quant=None to train, or torch.no_grad()")
    if method is not None:
        check_tail_plan(method, plan, quant)
        if method.name != CLUSTER_TAIL.name:
            method.group_size(plan.layout)
    spec = resolve_backend(backend, q, plan, needs_grad, quant, method)
    plan.validate_once()  # built by hand: checked once (host syncs), a planner's plan never
    if method is None:
        return spec.fn(q, k, v, plan, scale)
    return spec.fn(q, k, v, plan, scale, tail=method)


def check_tail_plan(method, plan, quant) -> None:
    """A tail needs exact attention, and a ``BlockPlan`` (summaries) or a ``ClusterPlan`` (``"centroid"``,
    matched by :func:`~sparsevid.tail.check_tail`)."""
    if quant is not None:
        raise ValueError(f"Expect quant=None with tail={method.name!r} (the 8-bit kernels have no tail pass) but got "
                         f"quant={quant!r}; use one of them")
    if not isinstance(plan, (BlockPlan, ClusterPlan)):
        raise TypeError(f"Expect a BlockPlan with tail={method.name!r} but got a {type(plan).__name__} (NYI: summaries "
                        "of a token plan's skipped keys); use tail=None with it")
