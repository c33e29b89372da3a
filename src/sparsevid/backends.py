"""The open registry of :func:`sparsevid.sparse_attention` backends.

A backend is one module under ``sparsevid/kernels/`` plus one :func:`register_backend` call that
declares what it supports: plan types, devices, dtypes, head dims, block sizes, GPU generations,
whether it has a backward, and how to tell that it is installed (checked once per process, not on
every call). :func:`resolve_backend` turns a requested name (or ``"auto"``) and the inputs into
the backend that runs them, or raises the same error type, naming what is missing, whichever
backend was asked for — before any kernel launch.

``auto`` tries the backends that allow it on the inputs' device, highest ``priority`` first, and
takes the first that supports the inputs: on Hopper/Blackwell with ``flash-attn-4`` installed
``fa4``, on other CUDA GPUs ``triton``, elsewhere (and for autograd inputs) ``reference``.

Quantized backends declare the ``quant`` they compute (``"int8"``, ``"fp8"``; exact backends
``None``). ``auto`` only ever picks a backend whose ``quant`` equals the one asked for, so 8-bit
attention runs only when ``quant=`` asks for it, and a quantized request never falls back to an
exact backend (nor, on CUDA, to the slow quantization reference): when no quantized backend can run
the inputs the refusal of the best one is raised.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from enum import Enum
from typing import Callable

import torch

__all__ = ["Backend", "BackendSpec", "QUANT_MODES", "available_backends", "check_quant", "describe_backends",
           "register_backend", "resolve_backend"]

QUANT_MODES = ("int8", "fp8")  # the values of ``quant=`` besides None (exact attention)


class Backend(str, Enum):
    """Names of the built-in backends (any registered name is accepted as a plain string too)."""

    AUTO = "auto"
    REFERENCE = "reference"  # pure PyTorch, any device: the CPU path, autograd, and the oracle
    TRITON = "triton"  # Triton block-sparse / token-gather kernels with the tile permutation fused (CUDA)
    FA4 = "fa4"  # FlashAttention-4 block-sparse (CuTe DSL) on tile-ordered tensors: Hopper/Blackwell
    FLEX = "flex"  # FlexAttention with the plan's BlockMask on gathered tensors (for comparison)
    TRITON_INT8 = "triton-int8"  # 8-bit Triton block-sparse: INT8 Q·Kᵀ, fp16 P·V (CUDA sm80+)
    TRITON_FP8 = "triton-fp8"  # 8-bit Triton block-sparse: FP8 e4m3 Q·Kᵀ and P·V (CUDA sm89+)
    REFERENCE_INT8 = "reference-int8"  # the int8 quantization in PyTorch: twin of triton-int8, CPU path
    REFERENCE_FP8 = "reference-fp8"  # the fp8 quantization in PyTorch: twin of triton-fp8, CPU path


@dataclass(frozen=True)
class BackendSpec:
    """What one backend declares (see :func:`register_backend` for the fields)."""

    name: str
    fn: Callable
    plans: tuple[type, ...]
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    head_dims: tuple[int, ...] | None
    block_sizes: tuple[int, ...] | None
    gpu_majors: tuple[int, ...] | None
    backward: tuple[str, ...]  # device types on which it trains
    priority: int
    auto_devices: tuple[str, ...]
    requires: Callable[[], str | None]
    description: str
    quant: str | None = None
    min_capability: tuple[int, int] | None = None
    tail: bool = False
    dtype_note: str | None = None

    def installed(self) -> str | None:
        """``None`` when the backend's software is importable, else the reason (checked once)."""
        if self.name not in _INSTALLED:
            _INSTALLED[self.name] = self.requires()
        return _INSTALLED[self.name]

    def unusable(self, device: torch.device) -> str | None:
        """Why the backend cannot run on ``device`` here (wrong device type, not installed, GPU
        generation), or ``None``."""
        if device.type not in self.devices:
            return f"it runs on {' or '.join(self.devices)}, not {device.type}"
        reason = self.installed()
        if reason is None and device.type == "cuda":
            reason = device_missing(device)
        if reason is None and device.type == "cuda" and self.gpu_majors is not None:
            major, minor = _capability(device)
            if major not in self.gpu_majors:
                reason = (f"it needs a GPU of compute capability {' or '.join(f'{m}.x' for m in self.gpu_majors)} "
                          f"and {device} is {major}.{minor}")
        if reason is None and device.type == "cuda" and self.min_capability is not None:
            major, minor = _capability(device)
            if (major, minor) < self.min_capability:
                need = ".".join(map(str, self.min_capability))
                reason = (f"it needs a GPU of compute capability >= {need}"
                          f"{' (FP8 tensor cores: Ada, Hopper, Blackwell)' if self.quant == 'fp8' else ''} "
                          f"and {device} is {major}.{minor}")
        return reason

    def refusal(self, q: torch.Tensor, plan, needs_grad: bool = False, tail=None) -> tuple[type[Exception], str] | None:
        """Why this backend cannot run ``q`` with ``plan`` (exception type and message), or None.
        ``needs_grad``: q, k or v requires grad (and grad is enabled); ``tail``: a summary method is asked."""
        name, device = self.name, q.device
        if device.type not in self.devices:
            return ValueError, (f"Expect tensors on {' or '.join(self.devices)} for backend {name!r} but got "
                                f"device {device}; use backend='reference' or move the tensors")
        reason = self.unusable(device)
        if reason is not None:
            return ValueError, f"Expect backend {name!r} to be usable but {reason}; use backend='auto' or 'reference'"
        if not isinstance(plan, self.plans):
            kinds = " or ".join(p.__name__ for p in self.plans)
            return TypeError, f"Expect a {kinds} for backend {name!r} but got a {type(plan).__name__}"
        if q.dtype not in self.dtypes:
            note = f" ({self.dtype_note})" if self.dtype_note else ""
            return TypeError, (f"Expect q.dtype in {[str(d) for d in self.dtypes]} for backend {name!r} but got "
                               f"{q.dtype}{note}; use backend='reference'")
        if self.head_dims is not None and q.shape[-1] not in self.head_dims:
            return ValueError, f"Expect head_dim in {self.head_dims} for backend {name!r} but got {q.shape[-1]}"
        # a ClusterPlan has no block size (its clusters are token ranges)
        if self.block_sizes is not None and getattr(plan, "block_size", None) not in (None, *self.block_sizes):
            return ValueError, (f"Expect plan.block_size in {self.block_sizes} for backend {name!r} but got "
                                f"{plan.block_size}")
        if needs_grad and device.type not in self.backward:
            trains = f"its backward runs on {' or '.join(self.backward)} only" if self.backward else "forward only"
            return ValueError, (f"Expect inputs without requires_grad for backend {name!r} on {device.type} ({trains}) "
                                "but q, k or v requires grad; use backend='reference' to train, or torch.no_grad()")
        if tail is not None and not self.tail:
            return ValueError, tail_refusal(name, tail)
        return None


_REGISTRY: dict[str, BackendSpec] = {}
_BUILTIN_MODULES = ("reference", "flex", "triton_backend", "fa4", "reference_quant")


def register_backend(
    name: str,
    *,
    plans: tuple[type, ...],
    devices: tuple[str, ...],
    dtypes: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32),
    head_dims: tuple[int, ...] | None = None,
    block_sizes: tuple[int, ...] | None = None,
    gpu_majors: tuple[int, ...] | None = None,
    backward: bool | tuple[str, ...] = False,
    priority: int = 0,
    auto_devices: tuple[str, ...] = (),
    requires: Callable[[], str | None] = lambda: None,
    description: str = "",
    quant: str | None = None,
    min_capability: tuple[int, int] | None = None,
    tail: bool = False,
    dtype_note: str | None = None,
):
    """Decorator: register ``fn(q, k, v, plan, scale) -> out`` (inputs already validated).

    Args:
        name (str): the ``backend=`` value (unique).
        plans (tuple[type]): plan types it executes (``BlockPlan``, ``TokenPlan``).
        devices (tuple[str]): device types it runs on.
        dtypes, head_dims, block_sizes: what it computes (``None``: any head dim / block size).
        gpu_majors (tuple[int] | None): CUDA compute-capability majors it needs (``(9, 10)``: Hopper, Blackwell).
        backward (bool | tuple[str]): the device types on which it supports autograd (``True``: all of
            ``devices``); inputs that require grad go elsewhere otherwise.
        priority (int): ``auto`` prefers higher priorities.
        auto_devices (tuple[str]): device types on which ``auto`` may pick it (empty: only when named).
        requires (callable): returns ``None`` when its software is installed, else the reason; called
            once per process.
        description (str): one line for :func:`describe_backends`.
        quant (str | None): the quantization it computes (``"int8"``, ``"fp8"``); ``None``: exact.
            ``auto`` picks it only for that ``quant=``.
        min_capability (tuple[int, int] | None): lowest CUDA compute capability it runs on, e.g.
            ``(8, 9)`` for FP8 tensor cores.
        tail (bool): it keeps the skipped blocks as summaries (:mod:`sparsevid.tail`): it is then called
            ``fn(q, k, v, plan, scale, tail=method)`` when ``tail=`` asks; ``auto`` skips it otherwise.
        dtype_note (str | None): why ``dtypes`` leaves out a dtype, said when one is refused.
    """

    def wrap(fn):
        if name in _REGISTRY or name == Backend.AUTO.value:
            raise ValueError(f"Expect a new backend name but {name!r} is already registered")
        if quant is not None and quant not in QUANT_MODES:
            raise ValueError(f"Expect quant in {QUANT_MODES} or None but got {quant!r}")
        _REGISTRY[name] = BackendSpec(
            name, fn, tuple(plans), tuple(devices), tuple(dtypes), head_dims, block_sizes, gpu_majors,
            tuple(devices) if backward is True else tuple(backward or ()),
            priority, tuple(auto_devices), requires, description, quant,
            tuple(min_capability) if min_capability is not None else None, tail, dtype_note,
        )
        return fn

    return wrap


# Plain dicts, not functools caches: torch.compile reads them as constants once filled (a traced
# lru_cache would run the wrapped check, e.g. an import, inside the graph).
_INSTALLED: dict[str, str | None] = {}
_CAPABILITY: dict[torch.device, tuple[int, int] | None] = {}  # None: no such CUDA device in this process


def _capability(device: torch.device) -> tuple[int, int] | None:
    if device not in _CAPABILITY:
        present = torch.cuda.is_available() and (device.index is None or device.index < torch.cuda.device_count())
        _CAPABILITY[device] = torch.cuda.get_device_capability(device) if present else None
    return _CAPABILITY[device]


def device_missing(device: torch.device) -> str | None:
    """Why CUDA ``device`` does not exist in this process (torch without CUDA, no GPU visible, an index past
    the GPUs), or ``None`` (also for any other device type). Checked once per device."""
    if device.type != "cuda" or _capability(device) is not None:
        return None
    if torch.version.cuda is None:
        return f"there is no {device} here: this torch {torch.__version__} is built without CUDA"
    if not torch.cuda.is_available():
        return f"there is no {device} here: no CUDA GPU is visible to this process"
    return f"there is no {device} here: this process sees {torch.cuda.device_count()} GPU(s)"


def as_device(device, name: str = "device") -> torch.device:
    """``device`` (a ``torch.device`` or its name) as a ``torch.device``; a ``ValueError`` naming ``name`` if it
    is none."""
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"Expect {name} to be a torch device (cpu, cuda, cuda:1, ...) but got {device!r}") from None


_LOADED: list[bool] = []


def _registry() -> dict[str, BackendSpec]:
    if not _LOADED:  # the built-in backends' registrations, imported once (and never traced)
        for module in _BUILTIN_MODULES:
            importlib.import_module(f"sparsevid.kernels.{module}")
        _LOADED.append(True)
    return _REGISTRY


def backend_names() -> list[str]:
    """Every registered backend name, plus ``"auto"``."""
    return [Backend.AUTO.value, *_registry()]


def resolve_backend(backend: str | Backend, q: torch.Tensor, plan, needs_grad: bool = False,
                    quant: str | None = None, tail=None) -> BackendSpec:
    """The backend that runs ``q`` with ``plan``: the named one, or ``auto``'s choice (``needs_grad``:
    q, k or v requires grad; ``quant``: ``None`` for exact attention, or ``"int8"`` / ``"fp8"``; ``tail``:
    a :class:`~sparsevid.tail.TailMethod`, which ``auto`` gives only to backends that run it).

    ``auto`` considers only backends whose declared ``quant`` equals ``quant``. A named backend must
    compute the ``quant`` asked for; ``quant=None`` with a named quantized backend runs that backend
    (its name says what it computes).

    Raises:
        ValueError / TypeError: an unknown name or ``quant``, or a named backend that cannot run these
            inputs (the message names what is missing). Exact ``auto`` always finds one (``reference``
            runs anything); quantized ``auto`` raises the refusal of the best quantized backend.
    """
    registry = _registry()
    name = check_backend_name(backend)
    quant = check_quant(quant)
    if name == Backend.AUTO.value:
        candidates = sorted((s for s in registry.values() if q.device.type in s.auto_devices and s.quant == quant),
                            key=lambda s: -s.priority)
        for spec in candidates:
            if spec.refusal(q, plan, needs_grad, tail) is None:
                return spec
        if quant is None:
            name = Backend.REFERENCE.value
        elif candidates:
            exc, message = candidates[0].refusal(q, plan, needs_grad, tail)
            raise exc(f"quant={quant!r}: {message}")
        else:
            raise ValueError(f"Expect a device with a quant={quant!r} backend (cuda, cpu) but got {q.device}; "
                             "use quant=None")
    spec = registry[name]
    if quant is not None and spec.quant != quant:
        fitting = [s.name for s in registry.values() if s.quant == quant]
        raise ValueError(f"Expect a backend computing quant={quant!r} ({', '.join(fitting)} or 'auto') but got "
                         f"backend {name!r}, which computes {spec.quant or 'exact attention'}; use backend='auto'")
    refusal = spec.refusal(q, plan, needs_grad, tail)
    if refusal is not None:
        exc, message = refusal
        raise exc(message)
    return spec


def check_quant(quant) -> str | None:
    """Validate a ``quant=`` value: ``None`` (exact attention), ``"int8"`` or ``"fp8"``; returns it."""
    if quant is not None and (not isinstance(quant, str) or quant not in QUANT_MODES):
        raise ValueError(f"Expect quant in (None, {', '.join(repr(m) for m in QUANT_MODES)}) but got {quant!r}")
    return quant


def tail_backends() -> list[str]:
    """The registered backends that run ``tail=`` (keep the skipped blocks as summaries)."""
    return [s.name for s in _registry().values() if s.tail]


def tail_refusal(name: str, tail) -> str:
    """Why backend ``name`` refuses ``tail=`` (one message for the call and for ``apply``)."""
    return (f"Expect a backend that runs tail={getattr(tail, 'name', tail)!r} ({', '.join(tail_backends())} or 'auto') "
            f"but got backend {name!r} ({_registry()[name].description}), which has no tail pass; "
            "use tail=None with it")


def backend_spec(name: str) -> BackendSpec:
    """The registration of backend ``name`` (a registered name, not ``"auto"``)."""
    return _registry()[name]


def check_backend_name(backend) -> str:
    """Validate a ``backend=`` value without inputs (e.g. at ``sparsevid.apply`` time); returns the name."""
    name = backend.value if isinstance(backend, Backend) else backend
    if not isinstance(name, str) or (name != Backend.AUTO.value and name not in _registry()):
        raise ValueError(f"Expect backend in {backend_names()} but got {backend!r}")
    return name


def available_backends(device: str | torch.device = "cpu") -> list[str]:
    """Backends whose software is installed and that run on ``device`` (and its GPU generation)."""
    return [d["name"] for d in describe_backends(device) if d["usable"]]


def describe_backends(device: str | torch.device = "cpu") -> list[dict]:
    """Every registered backend with its declared capabilities and whether it is usable on ``device``.

    Each entry: ``name``, ``plans``, ``devices``, ``dtypes``, ``head_dims``, ``block_sizes``,
    ``gpu_majors``, ``min_capability``, ``quant``, ``tail``, ``backward``, ``priority``, ``auto`` (device types
    where ``auto`` may pick it),
    ``usable`` (bool), ``reason`` (why not, or ``None``: a CUDA device missing here is a reason, not an
    error) and ``description``. ``backward``: the device types on which it trains.
    """
    device = as_device(device)
    rows = []
    for spec in _registry().values():
        reason = spec.unusable(device)
        rows.append(dict(
            name=spec.name, plans=[p.__name__ for p in spec.plans], devices=list(spec.devices),
            dtypes=[str(d).removeprefix("torch.") for d in spec.dtypes],
            head_dims=list(spec.head_dims) if spec.head_dims else "any",
            block_sizes=list(spec.block_sizes) if spec.block_sizes else "any",
            gpu_majors=list(spec.gpu_majors) if spec.gpu_majors else "any",
            min_capability=".".join(map(str, spec.min_capability)) if spec.min_capability else "any",
            quant=spec.quant, tail=spec.tail, backward=list(spec.backward),
            priority=spec.priority, auto=list(spec.auto_devices), usable=reason is None, reason=reason,
            description=spec.description,
        ))
    return rows
