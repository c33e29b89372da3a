"""``sparse_attention``: execute a :class:`BlockPlan` (or an M x 1 :class:`TokenPlan`) on q, k, v — the
one public entry to the kernels.

The public function validates everything that can be checked from metadata (no host sync, so it
stays cheap, ``torch.compile``-able and CUDA-graph capturable), then dispatches to a backend from
an Enum-keyed registry. Backends assume valid inputs and never decide sparsity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Callable

import torch

from .plan import BlockPlan
from .token_plan import TokenPlan

__all__ = ["Backend", "sparse_attention", "available_backends"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class Backend(str, Enum):
    """Kernel backends of :func:`sparse_attention`."""

    AUTO = "auto"
    REFERENCE = "reference"  # pure PyTorch, any device: the CPU path and the oracle
    TRITON = "triton"  # Triton block-sparse / token-gather kernels with the tile permutation fused (CUDA)
    FLEX = "flex"  # FlexAttention with the plan's BlockMask on gathered tensors (for comparison)


@dataclass(frozen=True)
class _BackendSpec:
    fn: Callable
    devices: tuple[str, ...]  # device types it runs on
    dtypes: tuple[torch.dtype, ...]
    head_dims: tuple[int, ...] | None  # None: any
    available: Callable[[torch.device], str | None]  # None when usable on that device, else the reason


_REGISTRY: dict[Backend, _BackendSpec] = {}


def register_backend(name: Backend, *, devices, dtypes=SUPPORTED_DTYPES, head_dims=None, available=lambda device: None):
    """Decorator: register ``fn(q, k, v, plan, scale) -> out`` for validated inputs."""

    def wrap(fn):
        _REGISTRY[name] = _BackendSpec(fn, tuple(devices), tuple(dtypes), head_dims, available)
        return fn

    return wrap


def available_backends(device: str | torch.device = "cpu") -> list[str]:
    """Backends usable on ``device`` in this installation."""
    device = torch.device(device)
    return [b.value for b, s in _REGISTRY.items() if device.type in s.devices and s.available(device) is None]


def _resolve_backend(backend, device: torch.device) -> tuple[Backend, _BackendSpec]:
    try:
        name = Backend(backend)
    except ValueError:
        raise ValueError(f"Expect backend in {[b.value for b in Backend]} but got {backend!r}") from None
    if name is Backend.AUTO:
        if device.type == "cuda" and _REGISTRY[Backend.TRITON].available(device) is None:
            name = Backend.TRITON
        else:
            name = Backend.REFERENCE
    if name not in _REGISTRY:
        raise ValueError(f"NYI: backend {name.value!r} is not built into this installation")
    spec = _REGISTRY[name]
    if device.type not in spec.devices:
        raise ValueError(
            f"Expect tensors on {' or '.join(spec.devices)} for backend {name.value!r} but got device {device}; "
            "use backend='reference' or move the tensors"
        )
    reason = spec.available(device)
    if reason is not None:
        raise ValueError(f"Expect backend {name.value!r} to be usable but {reason}; use backend='reference'")
    return name, spec


def _check_inputs(q, k, v, plan) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"Expect {name} to be a torch.Tensor but got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"Expect {name} of shape (B, heads, L, D) (4-D) but got {t.dim()}-D shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"Expect {name}.dtype in float16, bfloat16, float32 but got {t.dtype}")
    if not isinstance(plan, (BlockPlan, TokenPlan)):
        raise TypeError(f"Expect plan to be a sparsevid.BlockPlan or sparsevid.TokenPlan but got {type(plan).__name__}")
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
    L = plan.layout.num_tokens
    if q.shape[2] != L or k.shape[2] != L:
        raise ValueError(
            f"Expect sequence length L={L} (plan.layout.num_tokens, {plan.layout}) but got "
            f"q L={q.shape[2]}, k L={k.shape[2]}; build the layout from the token grid of these tensors"
        )
    B, H = q.shape[:2]
    pb, ph = plan.shape
    if pb not in (1, B) or ph not in (1, H):
        raise ValueError(f"Expect a plan for batch {B} (or 1) and heads {H} (or 1) but got plan.shape=({pb}, {ph})")
    if plan.device != q.device:
        raise ValueError(f"Expect plan on {q.device} like q but got {plan.device}; use plan.to(q.device)")


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: BlockPlan | TokenPlan,
    *,
    scale: float | None = None,
    backend: str | Backend = "auto",
) -> torch.Tensor:
    """Block-sparse attention ``softmax(q kᵀ · scale + plan mask) v``, in the original token order.

    Args:
        q (Tensor): ``(batch, heads, L, head_dim)``, any strides (a ``(batch, L, heads, head_dim)``
            tensor ``.transpose(1, 2)`` is read in place on the GPU path).
        k (Tensor): ``(batch, heads, L, head_dim)``.
        v (Tensor): ``(batch, heads, L, head_dim)``.
        plan (BlockPlan | TokenPlan): which blocks (or, for a ``TokenPlan``, which key tokens per query
            block) to compute; ``L == plan.layout.num_tokens``; its batch and heads equal q's or are 1
            (broadcast).
        scale (float, optional): softmax scale, default ``1 / sqrt(head_dim)``.
        backend (str): ``"auto"`` (triton on CUDA, reference elsewhere), ``"triton"``, ``"flex"`` (BlockPlan
            only) or ``"reference"``. A ``TokenPlan`` runs on the Triton gather kernel or its reference twin.

    Returns:
        Tensor ``(batch, heads, L, head_dim)`` in q's dtype. Entries outside the plan get zero weight,
        exactly like ``scaled_dot_product_attention(q, k, v, attn_mask=plan.to_mask())``.

    Raises:
        TypeError / ValueError: naming the argument, before any kernel launch. Values are not
        inspected (NaN propagates as in SDPA): planners reject non-finite q/k.
    """
    _check_inputs(q, k, v, plan)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"Expect scale to be a positive finite float but got {scale!r}")
    name, spec = _resolve_backend(backend, q.device)
    if q.dtype not in spec.dtypes:
        raise TypeError(
            f"Expect q.dtype in {[str(d) for d in spec.dtypes]} for backend {name.value!r} but got {q.dtype}; "
            "use backend='reference'"
        )
    head_dim = q.shape[-1]
    if spec.head_dims is not None and head_dim not in spec.head_dims:
        raise ValueError(f"Expect head_dim in {spec.head_dims} for backend {name.value!r} but got {head_dim}")
    return spec.fn(q, k, v, plan, float(scale))


# ---------------------------------------------------------------------- backends
from .kernels.reference import sparse_attention_reference, sparse_attention_reference_tokens  # noqa: E402


@register_backend(Backend.REFERENCE, devices=("cpu", "cuda", "mps", "xpu"))
def _reference_backend(q, k, v, plan, scale):
    if isinstance(plan, TokenPlan):
        return sparse_attention_reference_tokens(
            q, k, v, plan.perm, plan.kv_num_tokens, plan.kv_tokens, plan.block_size, scale
        )
    return sparse_attention_reference(q, k, v, plan.perm, plan.kv_num_blocks, plan.kv_indices, plan.block_size, scale)


@register_backend(Backend.FLEX, devices=("cpu", "cuda"))
def _flex_backend(q, k, v, plan, scale):
    """FlexAttention on tensors gathered into tile order (eager here; wrap in torch.compile for speed)."""
    from torch.nn.attention.flex_attention import flex_attention

    if isinstance(plan, TokenPlan):
        raise NotImplementedError("NYI: backend 'flex' for a TokenPlan; use backend='triton' or 'reference'")
    layout = plan.layout
    gathered = [layout.to_tiles(t) for t in (q, k, v)]
    out = flex_attention(*gathered, block_mask=plan.to_block_mask(), scale=scale)
    return layout.from_tiles(out)


def _triton_available(device: torch.device) -> str | None:
    import importlib.util
    import os

    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'sparsevid[triton]')"
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "CPU tensors run Triton only under the interpreter (TRITON_INTERPRET=1, tests only)"
    return None


@register_backend(
    Backend.TRITON,
    devices=("cuda", "cpu"),
    dtypes=(torch.float16, torch.bfloat16),
    head_dims=(64, 96, 128),
    available=_triton_available,
)
def _triton_backend(q, k, v, plan, scale):
    B, H = q.shape[:2]
    if isinstance(plan, TokenPlan):
        from .kernels.triton_gather import token_sparse_attn

        kv_num_tokens = plan.kv_num_tokens.expand(B, H, -1)
        kv_tokens = plan.kv_tokens.expand(B, H, -1, -1)
        return token_sparse_attn(q, k, v, plan.perm, kv_num_tokens, kv_tokens, plan.block_size, scale)

    from .kernels.triton_blocksparse import block_sparse_attn

    # A broadcast plan becomes a stride-0 view: the kernel indexes it with q's batch and head.
    kv_num_blocks = plan.kv_num_blocks.expand(B, H, -1)
    kv_indices = plan.kv_indices.expand(B, H, -1, -1)
    return block_sparse_attn(q, k, v, plan.perm, kv_num_blocks, kv_indices, plan.block_size, scale)
