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

Every caller asks this registry: one GPU (:func:`sparsevid.sparse_attention`), a ring step
(:mod:`sparsevid.parallel.ring`, ``needs=("ring",)``), 8-bit attention (``quant=``), the tail (``tail=``), and
``sparsevid.apply``'s check of its settings before anything runs (:func:`check_settings`, the same checks on
metadata alone). What a caller needs is declared at :func:`register_backend` and checked in one place
(:meth:`BackendSpec.refusal_for`); no other module branches on a backend's name.

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

__all__ = ["Backend", "BackendSpec", "NEEDS", "QUANT_MODES", "available_backends", "check_quant", "check_settings",
           "describe_backends", "register_backend", "register_quant_backends", "resolve_backend"]

QUANT_MODES = ("int8", "fp8")  # the values of ``quant=`` besides None (exact attention)
NEEDS = ("ring",)  # capabilities a caller may need beyond the inputs (``resolve_backend(needs=...)``)


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
    summarize: Callable | None = None  # the tail's summary builder: the backend runs ``tail=``
    dtype_note: str | None = None
    ring_step: Callable | None = None  # one ring step: a key chunk with its own table, log-sum-exp out

    @property
    def tail(self) -> bool:
        """It runs ``tail=`` (keeps the skipped blocks as summaries, built by its ``summarize``)."""
        return self.summarize is not None

    @property
    def ring(self) -> bool:
        """It runs a ring step (:mod:`sparsevid.parallel.ring`)."""
        return self.ring_step is not None

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

    def refusal(self, q: torch.Tensor, plan, needs_grad: bool = False, tail=None,
                needs: tuple[str, ...] = ()) -> tuple[type[Exception], str] | None:
        """Why this backend cannot run ``q`` with ``plan`` (exception type and message), or None.
        ``needs_grad``: q, k or v requires grad (and grad is enabled); ``tail``: a summary method is asked;
        ``needs``: capabilities of :data:`NEEDS` the caller uses."""
        return self.refusal_for(device=q.device, plan_type=type(plan), dtype=q.dtype, head_dim=q.shape[-1],
                                block_size=getattr(plan, "block_size", None), needs_grad=needs_grad, tail=tail, needs=needs)

    def refusal_for(self, *, device: torch.device | None = None, plan_type: type | None = None,
                    dtype: torch.dtype | None = None, head_dim: int | None = None, block_size: int | None = None,
                    needs_grad: bool = False, tail=None, needs: tuple[str, ...] = ()
                    ) -> tuple[type[Exception], str] | None:
        """:meth:`refusal` from metadata alone: what is ``None`` is not known yet and not checked (``device=None``:
        only whether the backend is installed). The one place a backend's declared capabilities are checked."""
        name = self.name
        if "ring" in needs and not self.ring:
            ring = ", ".join(s.name for s in _registry().values() if s.ring)
            return NotImplementedError, (f"NYI: backend {name!r} under ring attention (ring steps run on {ring}); "
                                         "use backend='auto'")
        if plan_type is not None and not issubclass(plan_type, self.plans):
            kinds = " or ".join(p.__name__ for p in self.plans)
            return TypeError, f"Expect a {kinds} for backend {name!r} but got a {plan_type.__name__}"
        if tail is not None and not self.tail:
            return ValueError, tail_refusal(name, tail)
        if device is not None and device.type not in self.devices:
            runs = " or ".join(self.devices)
            return ValueError, (f"Expect tensors on {runs} for backend {name!r} but got device {device} (it runs on "
                                f"{runs}, not {device.type}); use backend='reference' or move the tensors")
        reason = self.unusable(device) if device is not None else self.installed()
        if reason is not None:
            return ValueError, f"Expect backend {name!r} to be usable but {reason}; use backend='auto' or 'reference'"
        if dtype is not None and dtype not in self.dtypes:
            note = f" ({self.dtype_note})" if self.dtype_note else ""
            return TypeError, (f"Expect q.dtype in {[str(d) for d in self.dtypes]} for backend {name!r} but got "
                               f"{dtype}{note}; use backend='reference'")
        if head_dim is not None and self.head_dims is not None and head_dim not in self.head_dims:
            return ValueError, f"Expect head_dim in {self.head_dims} for backend {name!r} but got {head_dim}"
        if block_size is not None and self.block_sizes is not None and block_size not in self.block_sizes:
            return ValueError, (f"Expect plan.block_size in {self.block_sizes} for backend {name!r} but got "
                                f"{block_size}")
        if needs_grad and device is not None and device.type not in self.backward:
            trains = f"its backward runs on {' or '.join(self.backward)} only" if self.backward else "forward only"
            return ValueError, (f"Expect inputs without requires_grad for backend {name!r} on {device.type} ({trains}) "
                                "but q, k or v requires grad; use backend='reference' to train, or torch.no_grad()")
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
    summarize: Callable | None = None,
    dtype_note: str | None = None,
    ring_step: Callable | None = None,
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
        summarize (callable | None): how it builds the tail's summaries, ``summarize(k, v, layout, method) ->
            TailSummaries`` (:mod:`sparsevid.tail`): declaring it says the backend keeps the skipped blocks as
            summaries; it is then called ``fn(q, k, v, plan, scale, tail=method)`` when ``tail=`` asks (and a ring
            step builds its summaries with it); ``auto`` skips a backend without one when a tail is asked.
        dtype_note (str | None): why ``dtypes`` leaves out a dtype, said when one is refused.
        ring_step (callable | None): one step of ring attention (:mod:`sparsevid.parallel.ring`), ``ring_step(q, k, v, perm,
            kv_num_blocks, kv_indices, block_size, scale, *, tail, kept, gate, key_perm) -> (out, lse)``: query rows
            through ``perm``, the key chunk's blocks through its own table ``key_perm``, float32 output and each
            row's natural-log log-sum-exp (zeros and ``-inf`` for a row that computes nothing); ``tail``/``kept``
            as the summary terms and keep mask of the rows' own chunk, or ``None``; ``gate`` the call's decision on
            them (:func:`sparsevid.tail.decide_tail`).
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
            tuple(min_capability) if min_capability is not None else None, summarize, dtype_note, ring_step,
        )
        return fn

    return wrap


def register_quant_backends(family: str, run: Callable, *, int8: dict, fp8: dict, **common) -> None:
    """Register one backend per 8-bit mode of :data:`QUANT_MODES`, ``"{family}-int8"`` and ``"{family}-fp8"``, each
    ``run(q, k, v, plan, scale, quant)`` with its ``quant``: ``common`` holds the :func:`register_backend`
    options they share, ``int8`` / ``fp8`` each mode's own (its ``description``, block sizes, GPU generation)."""
    per_mode = {"int8": int8, "fp8": fp8}
    for quant in QUANT_MODES:
        def fn(q, k, v, plan, scale, _quant=quant):
            return run(q, k, v, plan, scale, _quant)

        register_backend(f"{family}-{quant}", quant=quant, **common, **per_mode[quant])(fn)


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
                    quant: str | None = None, tail=None, needs: tuple[str, ...] = ()) -> BackendSpec:
    """The backend that runs ``q`` with ``plan``: the named one, or ``auto``'s choice (``needs_grad``:
    q, k or v requires grad; ``quant``: ``None`` for exact attention, or ``"int8"`` / ``"fp8"``; ``tail``:
    a :class:`~sparsevid.tail.TailMethod`, which ``auto`` gives only to backends that run it; ``needs``:
    capabilities of :data:`NEEDS`, e.g. ``("ring",)`` for a ring step).

    ``auto`` considers only backends whose declared ``quant`` equals ``quant``. A named backend must
    compute the ``quant`` asked for; ``quant=None`` with a named quantized backend runs that backend
    (its name says what it computes).

    Raises:
        ValueError / TypeError: an unknown name or ``quant``, or a named backend that cannot run these
            inputs (the message names what is missing). Exact ``auto`` always finds one (``reference``
            runs anything); quantized ``auto`` raises the refusal of the best quantized backend.
        NotImplementedError: a named backend without a capability of ``needs`` (``NYI``).
    """
    return _choose(backend, quant, needs, dict(
        device=q.device, plan_type=type(plan), dtype=q.dtype, head_dim=q.shape[-1], block_size=getattr(plan, "block_size", None),
        needs_grad=needs_grad, tail=tail))


def check_settings(backend: str | Backend = "auto", *, device=None, dtype: torch.dtype | None = None,
                   head_dim: int | None = None, block_size: int | None = None, plan_type: type | None = None,
                   tail=None, quant: str | None = None, ring: bool = False) -> BackendSpec | None:
    """:func:`resolve_backend` before there are tensors (``sparsevid.apply`` time): raise the error the first
    call would raise for what is known now. Unknown metadata (``None``) is not checked; ``device=None`` checks
    only that a named backend is installed. ``tail``: a ``tail=`` value; ``ring``: the calls are ring steps.

    Returns:
        The backend that runs calls of this metadata as far as it is known (``None`` for ``auto`` without a
        device: the choice depends on where the model runs).

    Raises:
        ValueError / TypeError / NotImplementedError: as the call would.
    """
    from .tail import auto_tail, check_tail

    device = None if device is None else as_device(device)
    method = check_tail(tail)
    if isinstance(method, str):  # "auto": the plan type's default tail (none where the plan type is unknown)
        method = auto_tail(plan_type)
    meta = dict(device=device, plan_type=plan_type, dtype=dtype, head_dim=head_dim, block_size=block_size,
                tail=method)
    return _choose(backend, quant, ("ring",) if ring else (), meta)


def _choose(backend, quant, needs, meta: dict) -> BackendSpec | None:
    """The backend named, or ``auto``'s: the first backend by priority that ``auto`` may pick on the device,
    computes ``quant``, and runs ``meta`` (:meth:`BackendSpec.refusal_for`' arguments) with ``needs``."""
    registry = _registry()
    name = check_backend_name(backend)
    quant = check_quant(quant)
    unknown = sorted(set(needs) - set(NEEDS))
    if unknown:
        raise ValueError(f"Expect needs among {NEEDS} but got {', '.join(map(repr, unknown))}")
    device = meta["device"]
    if name == Backend.AUTO.value:
        candidates = sorted((s for s in registry.values() if s.quant == quant
                             and (device is None or device.type in s.auto_devices)), key=lambda s: -s.priority)
        for spec in candidates:
            if spec.refusal_for(needs=needs, **meta) is None:
                return spec if device is not None else None
        if quant is None:
            name = Backend.REFERENCE.value
        elif candidates:
            exc, message = candidates[0].refusal_for(needs=needs, **meta)
            raise exc(f"quant={quant!r}: {message}")
        else:
            raise ValueError(f"Expect a device with a quant={quant!r} backend (cuda, cpu) but got {device}; "
                             "use quant=None")
    spec = registry[name]
    if quant is not None and spec.quant != quant:
        fitting = [s.name for s in registry.values() if s.quant == quant]
        raise ValueError(f"Expect a backend computing quant={quant!r} ({', '.join(fitting)} or 'auto') but got "
                         f"backend {name!r}, which computes {spec.quant or 'exact attention'}; use backend='auto'")
    refusal = spec.refusal_for(needs=needs, **meta)
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
    ``gpu_majors``, ``min_capability``, ``quant``, ``tail``, ``ring`` (it runs a ring step), ``backward``,
    ``priority``, ``auto`` (device types where ``auto`` may pick it),
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
            quant=spec.quant, tail=spec.tail, ring=spec.ring, backward=list(spec.backward),
            priority=spec.priority, auto=list(spec.auto_devices), usable=reason is None, reason=reason,
            description=spec.description,
        ))
    return rows
