"""FastCar under CUDA graphs: a static-cache greedy decoder with the replay decision on the device.

:mod:`sparsevid.decoder.fastcar` hooks ``transformers``' own forward; each decision there reads the
number of kept rows on the host, and eager ``transformers`` decode is host-bound anyway. This
module runs the same Llama-family weights through its own decode step, written for capture:

- **Static buffers.** A KV cache ``(layers, B, kv_heads, max_len, head_dim)``, the FastCar MLP ring
  ``(layers, B, P, hidden)``, the input ids, the position and the output tokens live on the device;
  one decode step reads and advances them, so one captured ``torch.cuda.CUDAGraph`` replays the
  whole greedy loop (argmax, next input, position) with no host work but the replay call.
- **Explicit capture, not ``torch.compile(mode="reduce-overhead")``.** The step must contain the
  data-dependent skip (a CUDA graph *conditional node*, or kernels that read the decision) and must
  never sync; an explicit capture fails loudly on any host sync, keeps one graph per (batch, mode),
  and does not depend on how a ``transformers`` version builds its masks and caches. ``fuse=True``
  still lets ``torch.compile`` fuse the element-wise pieces (RMSNorm, RoPE, the decision, the
  select) into Triton kernels that the explicit capture records.
- **The decision on the device.** Per layer and row at position ``p >= P``:
  ``TAS = mean_h q_h(p) . k_h(p - P) / sqrt(head_dim)`` (``k(p - P)`` read from the KV cache, which
  holds post-RoPE keys), ``replay = TAS >= threshold[l]`` with the thresholds a device tensor
  (changed without recapture). On CUDA one Triton launch a layer (:mod:`sparsevid.decoder.triton_decide`;
  in PyTorch it is nine small kernels, which cost 15% of a batch-1 decode step on an H100).

MLP modes (``decision``/``mlp``/``capacity``)::

    decision="none"    every row through the MLP (the baseline)
    decision="host"    the reference: kept rows counted on the host (one sync per layer), MLP on them
    decision="device", mlp="triton"
                       the predicated Triton MLP (:mod:`sparsevid.decoder.triton_mlp`) reads the
                       replay mask itself: a tile of rows that all replay returns before loading a
                       weight, and replayed rows keep the previous frame's output. Up to 16 rows
                       (decode) the rows stay in place, so at batch 1 a replayed step reads no MLP
                       weight; above, kept rows are sorted first and the kernels, launched on all
                       rows, skip the tiles past the device-side count (frame-parallel: fewer kept
                       rows cost less). No conditional node, no sync, no capacity to choose
    decision="device", mlp="cublas", capacity=None
                       MLP on all rows, replayed rows selected on the device ("both branches");
                       under a graph with conditional nodes the MLP sits in an IF node that runs
                       only when some row is kept: at batch 1 a replayed step reads no MLP weights
    decision="device", mlp="cublas", capacity=C
                       kept rows compacted (stable sort on the device) into a C-row buffer, MLP on
                       it, scattered back; overflow rows (more than C kept) go through a second,
                       conditional MLP call on the rest. Pays where a step is compute-bound
                       (frame-parallel: ``forward_frame`` over B x P rows)

``mlp`` picks the kernels for the rows that run in every mode (``"triton"`` with ``decision="none"``
is the Triton kernels with nothing skipped, to compare them with cuBLAS). ``mlp="auto"`` (the
default) measures instead of guessing: with the device decision on CUDA, the first capture times
both paths above (cuBLAS as this decoder captures it, and the predicated Triton kernels) on this
device at the replay rate just measured, and keeps the faster (:func:`faster_mlp`; ``stats()["mlp"]``
says which, and the timings). Everywhere else (CPU, ``decision`` "none"/"host", a ``capacity``)
``"auto"`` is cuBLAS, untimed. Without a graph (CPU, tests) the conditional bodies always run and
their results are masked, so every mode gives the same values as the reference with the same ``mlp``.

Shape legend: ``B`` batch, ``T`` tokens per sequence in one forward (1 for a decode step, ``P``
for a frame), ``L`` decoder layers, ``H``/``KVH`` query/key heads, ``D`` head_dim, ``P`` tokens per
frame.
"""

from __future__ import annotations

import importlib.util
import math

import torch
import torch.nn.functional as F

from ._llama import decoder_layers, parse_thresholds, quantile_threshold, rotate_half

__all__ = ["MLP_KERNELS", "StaticDecoder", "calibrate_agreement", "conditional_nodes_available", "faster_mlp",
           "mlp_flop_share", "mlp_weight_share", "plot_frontier"]

MLP_KERNELS = ("cublas", "triton")  # what mlp="auto" chooses from, in the order a tie keeps


def conditional_nodes_available() -> bool:
    """CUDA graph IF nodes through ``torch.cuda.CUDAGraph.begin_capture_to_if_node`` (CUDA >= 12.4)."""
    return torch.cuda.is_available() and hasattr(torch.cuda.CUDAGraph, "begin_capture_to_if_node")


# ---------------------------------------------------------------------------------------- element-wise pieces
def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``LlamaRMSNorm``: float32 statistics, weight in the input dtype."""
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x`` (B, heads, T, D), ``cos``/``sin`` (T, D)."""
    return x * cos + rotate_half(x) * sin


def _silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def _decide(q: torch.Tensor, k_prev: torch.Tensor, eligible: torch.Tensor, threshold: torch.Tensor,
            scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """TAS (B, T) float32 of ``q`` (B, H, T, D) and ``k_prev`` (B, KVH, T, D); replay (B, T) bool."""
    B, H, T, D = q.shape
    rep = H // k_prev.shape[1]
    if rep > 1:
        k_prev = k_prev[:, :, None].expand(B, k_prev.shape[1], rep, T, D).reshape(B, H, T, D)
    tas = (q.float() * k_prev.float()).sum(-1).mean(1) * scale
    return tas, eligible & (tas >= threshold)


def _select(replay: torch.Tensor, prev: torch.Tensor, computed: torch.Tensor) -> torch.Tensor:
    return torch.where(replay[..., None], prev, computed)


def _compact(replay: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row order with the kept rows first, in row order (a stable sort on the device), and their count
    (a device scalar) for the flat mask ``replay`` (N,)."""
    return torch.argsort(replay.to(torch.int32), stable=True), replay.numel() - replay.sum()


_FUSABLE = ("_rms", "_rope", "_silu_mul", "_decide", "_select")


def faster_mlp(timings: dict) -> str:
    """The MLP kernels with the least time in ``timings`` (``{"cublas": ms, "triton": ms}``, from
    :meth:`StaticDecoder.capture`); a tie keeps cuBLAS (no Triton kernels to compile for other shapes)."""
    if not timings or set(timings) - set(MLP_KERNELS) or not all(ms >= 0 for ms in timings.values()):
        raise ValueError(f"Expect timings as {{kernels in {MLP_KERNELS}: ms >= 0}} but got {timings!r}")
    return min((k for k in MLP_KERNELS if k in timings), key=timings.__getitem__)


# ---------------------------------------------------------------------------------------- shares for the bounds
def mlp_weight_share(model: torch.nn.Module) -> float:
    """``m``: the MLP's share of the weight bytes a batch-1 decode step reads (one embedding row)."""
    total = mlp = 0
    embed = model.get_input_embeddings().weight
    for name, p in model.named_parameters():
        if p is embed:
            total += p.shape[1] * p.element_size()
            continue
        total += p.numel() * p.element_size()
        if ".mlp." in name:
            mlp += p.numel() * p.element_size()
    return mlp / total


def mlp_flop_share(model: torch.nn.Module, tokens_per_step: int, context: int) -> float:
    """``f``: the MLP's share of a forward's FLOPs (matmuls and attention scores over ``context`` keys)."""
    cfg = model.config
    hidden, inter = cfg.hidden_size, cfg.intermediate_size
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    D = getattr(cfg, "head_dim", None) or hidden // heads
    proj = 2 * hidden * (heads * D * 2 + kv * D * 2)
    scores = 2 * 2 * heads * D * context
    mlp = 2 * 3 * hidden * inter
    per_token = cfg.num_hidden_layers * (proj + scores + mlp) + 2 * hidden * cfg.vocab_size
    return cfg.num_hidden_layers * mlp / per_token


# ---------------------------------------------------------------------------------------- decoder
class StaticDecoder:
    """Greedy decoding of a Llama-family model from static device buffers, optionally with FastCar.

    Args:
        model: ``LlamaForCausalLM`` (or the same anatomy: Mistral, Qwen2/3). Its weights are used in place.
        batch (int): ``B``.
        max_len (int): prompt + generated tokens at most (rounded up to a multiple of 64).
        tokens_per_frame (int | None): ``P``; None = no FastCar (then ``decision`` must be "none").
        thresholds: TAS thresholds (one float, or one per layer; ``inf`` never replays).
        decision (str): "none", "host" (reference, one host sync per layer) or "device".
        mlp (str): kernels for the MLP rows that run: "cublas" (``F.linear``), "triton" (the predicated
            kernels; with the device decision they skip replayed rows themselves) or "auto" (the faster
            of the two, timed at the first capture with the device decision on CUDA; else cuBLAS).
            Uncaptured runs before that choice use cuBLAS; one choice per decoder (the first capture's
            shape: a decode step or a frame).
        capacity (int | None): device decision with cuBLAS only: rows of the compacted MLP buffer (None:
            no compaction; with ``mlp="auto"`` a capacity means cuBLAS).
        conditional (bool | None): put the MLP calls in CUDA graph IF nodes while capturing
            (default: where available).
        fuse (bool): ``torch.compile`` the element-wise pieces and concatenate q/k/v and gate/up weights.
        track (bool): count replayed rows on the device (``stats()``); off for timing.
    """

    def __init__(self, model, batch: int, max_len: int, tokens_per_frame: int | None = None, thresholds=None, *,
                 decision: str = "device", mlp: str = "auto", capacity: int | None = None,
                 conditional: bool | None = None, fuse: bool = False, track: bool = True):
        layers = decoder_layers(model)
        if decision not in ("none", "host", "device"):
            raise ValueError(f"Expect decision in ('none', 'host', 'device') but got {decision!r}")
        if mlp not in ("auto", *MLP_KERNELS):
            raise ValueError(f"Expect mlp in {('auto', *MLP_KERNELS)} but got {mlp!r}")
        if mlp == "triton" and capacity is not None:
            raise ValueError(f"Expect capacity=None with mlp='triton' (it compacts on the device-side count) "
                             f"but got {capacity!r}")
        if tokens_per_frame is None and decision != "none":
            raise ValueError("Expect tokens_per_frame for a FastCar decision; pass decision='none' for the baseline")
        if capacity is not None and (decision != "device" or not isinstance(capacity, int) or capacity < 1):
            raise ValueError(f"Expect capacity as an int >= 1 with decision='device' but got {capacity!r} ({decision})")
        self.model, self.layers = model, layers
        base = getattr(model, "model", model)
        self.embed, self.norm = base.embed_tokens, base.norm
        self.lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        cfg = model.config
        attn = layers[0].self_attn
        self.D = getattr(attn, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.H = attn.q_proj.out_features // self.D
        self.KVH = attn.k_proj.out_features // self.D
        self.hidden = cfg.hidden_size
        self.scaling = getattr(attn, "scaling", self.D**-0.5)
        self.B, self.P = batch, tokens_per_frame
        self.max_len = -(-max_len // 64) * 64
        self.decision, self.capacity, self.track = decision, capacity, track
        self.conditional = conditional_nodes_available() if conditional is None else conditional
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        # mlp: the kernels that run now; "auto" runs cuBLAS until the first capture has timed both
        self.mlp_request, self.mlp = mlp, "cublas" if mlp == "auto" else mlp
        self.mlp_rate: float | None = None  # the replay rate "auto" timed the kernels at
        self.mlp_ms: dict | None = None  # ms of every layer's MLP per kernels, as "auto" timed them
        self._auto = (mlp == "auto" and self.device.type == "cuda" and decision == "device" and capacity is None
                      and importlib.util.find_spec("triton") is not None)
        if mlp == "triton" or self._auto:
            from . import triton_mlp

            if self.device.type != "cuda" and not triton_mlp.INTERPRET:
                raise ValueError(f"Expect a CUDA model (or TRITON_INTERPRET=1) for mlp='triton' but it is on "
                                 f"{self.device}")
            self._predicated = triton_mlp.predicated_mlp
            self._in_place_rows = triton_mlp.GEMV_ROWS
        dev = self.device
        L = len(layers)
        self.k_cache = torch.zeros(L, batch, self.KVH, self.max_len, self.D, device=dev, dtype=self.dtype)
        self.v_cache = torch.zeros_like(self.k_cache)
        self.ring = torch.zeros(L, batch, tokens_per_frame or 1, self.hidden, device=dev, dtype=self.dtype)
        self.thr = torch.full((L,), math.inf, device=dev, dtype=torch.float32)
        self.set_thresholds(thresholds)
        self.replayed = torch.zeros(L, device=dev, dtype=torch.long)  # device-side counts (track=True)
        self.rows = [0] * L  # eligible rows, counted on the host from the positions decoded
        self.host_replayed = [0] * L
        self.log: list | None = None  # per forward and layer: replay (B, T) on the CPU, when a list
        self.tas_log: list | None = None  # per layer: TAS of eligible rows, when a list of lists
        with torch.no_grad():
            positions = torch.arange(self.max_len, device=dev)[None]
            cos, sin = base.rotary_emb(torch.zeros(1, device=dev, dtype=self.dtype), positions)
        self.cos, self.sin = cos[0], sin[0]  # (max_len, D), the model's own values
        self.key_pos = torch.arange(self.max_len, device=dev)
        # decode-step buffers (the graph's inputs and outputs)
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.step_idx = torch.zeros(1, dtype=torch.long, device=dev)
        self.out = torch.zeros(batch, self.max_len, dtype=torch.long, device=dev)
        self.teacher = torch.zeros(batch, self.max_len, dtype=torch.long, device=dev)
        self.use_teacher = False
        self.graphs: dict[bool, torch.cuda.CUDAGraph] = {}  # per use_teacher
        self.frame_graph: torch.cuda.CUDAGraph | None = None
        self._fns = {name: globals()[name] for name in _FUSABLE}
        # on CUDA the decision is one Triton launch a layer (decoder.triton_decide); elsewhere the PyTorch one
        self._decide_kernel = None
        if self.device.type == "cuda" and decision != "none" and importlib.util.find_spec("triton") is not None:
            from .triton_decide import decide_triton

            self._decide_kernel = decide_triton
        self._qkv = self._gate_up = None
        if fuse:
            for name in ("cache_size_limit", "recompile_limit"):  # one compile per shape: B, T, hidden
                if hasattr(torch._dynamo.config, name):
                    setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
            self._fns = {name: torch.compile(fn, dynamic=False, fullgraph=True) for name, fn in self._fns.items()}
            with torch.no_grad():
                self._qkv = [torch.cat([l.self_attn.q_proj.weight, l.self_attn.k_proj.weight, l.self_attn.v_proj.weight])
                             for l in layers]
                self._gate_up = [torch.cat([l.mlp.gate_proj.weight, l.mlp.up_proj.weight]) for l in layers]
        self._capturing = False

    # ------------------------------------------------------------------------------------ settings and report
    def set_thresholds(self, thresholds) -> None:
        """One float, or one per decoder layer; written into the device tensor the graph reads."""
        self.thr.copy_(torch.tensor(parse_thresholds(thresholds, len(self.layers)), dtype=torch.float32))

    def reset_stats(self) -> None:
        self.replayed.zero_()
        self.rows = [0] * len(self.layers)
        self.host_replayed = [0] * len(self.layers)

    def stats(self) -> dict:
        """Replay rate per layer and overall over eligible rows (one host read), and ``mlp``: the kernels
        asked for and running, with the rate and ms per kernels where "auto" timed them."""
        replayed = [a + b for a, b in zip(self.replayed.tolist(), self.host_replayed)]
        per = [dict(layer=i, rows=r, replayed=n, rate=n / r if r else None) for i, (r, n) in enumerate(zip(self.rows, replayed))]
        rows, n = sum(self.rows), sum(replayed)
        mlp = dict(requested=self.mlp_request, chosen=self.mlp, rate=self.mlp_rate, ms=self.mlp_ms)
        return dict(per_layer=per, rows=rows, replayed=n, replay_rate=n / rows if rows else None, mlp=mlp)

    # ------------------------------------------------------------------------------------ one forward
    def _count(self, start: int, T: int) -> None:
        """Host-side count of eligible rows of a forward at ``start`` (known without reading the device)."""
        if self.decision == "none":
            return
        eligible = max(0, start + T - max(start, self.P)) * self.B
        for i in range(len(self.layers)):
            self.rows[i] += eligible

    def _measure_replay(self, run) -> float:
        """Replay rate of ``run()`` (uncaptured: it counts its eligible rows with ``_count``) over every
        layer; the counters are left as they were."""
        replayed, rows, track = self.replayed.clone(), list(self.rows), self.track
        self.track = True
        try:
            run()
            eligible = sum(self.rows) - sum(rows)
            return float((self.replayed - replayed).sum()) / eligible if eligible else 0.0
        finally:
            self.replayed.copy_(replayed)
            self.rows, self.track = rows, track

    def _time_mlp(self, mlp: str, T: int, rate: float, reps: int = 8, rounds: int = 3) -> float:
        """Milliseconds of every layer's replay-aware MLP on ``B x T`` rows with ``mlp`` kernels, as this
        decoder captures it: one CUDA graph replayed on ``reps`` masks drawn at ``rate`` (the mask copied
        in between, the same for every kernels), CUDA events around them; the median of ``rounds``."""
        dev = self.device
        g = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(self.B, T, self.hidden, device=dev, dtype=self.dtype, generator=g)
        prev = torch.randn(self.B, T, self.hidden, device=dev, dtype=self.dtype, generator=g)
        masks = torch.rand(reps, self.B, T, device=dev, generator=g) < rate
        replay = masks[0].clone()
        running, replayed = self.mlp, self.replayed.clone()
        self.mlp = mlp
        try:
            graph = self._capture(lambda: [self._replay_mlp(i, x, replay, prev) for i in range(len(self.layers))])
            times = []
            for _ in range(rounds):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for k in range(reps):
                    replay.copy_(masks[k])
                    graph.replay()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / reps)
            return sorted(times)[rounds // 2]
        finally:
            self.mlp = running
            self.replayed.copy_(replayed)  # the replays counted their masks

    @torch.no_grad()
    def _choose_mlp(self, T: int, rate: float) -> None:
        """``mlp="auto"``: time both kernels at ``rate`` on ``B x T`` rows, keep the faster (once)."""
        self.mlp_ms = {mlp: self._time_mlp(mlp, T, rate) for mlp in MLP_KERNELS}
        self.mlp_rate, self.mlp, self._auto = rate, faster_mlp(self.mlp_ms), False

    def _mlp(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """The MLP on every row of ``x`` (..., hidden)."""
        mlp = self.layers[i].mlp
        if self.mlp == "triton":
            xf = x.reshape(-1, x.shape[-1])
            skip = torch.zeros(xf.shape[0], dtype=torch.bool, device=x.device)
            out = self._predicated(xf, skip, mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight,
                                   torch.empty_like(xf))
            return out.view(x.shape)
        if self._gate_up is None:
            return mlp(x)
        gate, up = F.linear(x, self._gate_up[i]).chunk(2, dim=-1)
        return F.linear(self._fns["_silu_mul"](gate, up), mlp.down_proj.weight)

    def _if(self, pred: torch.Tensor):
        """Context: the body becomes a CUDA graph IF node on ``pred`` while capturing, else runs always."""
        import contextlib

        if not (self._capturing and self.conditional):
            return contextlib.nullcontext()

        @contextlib.contextmanager
        def body():
            graph = torch.cuda.CUDAGraph.get_currently_capturing_graph()
            graph.begin_capture_to_if_node(pred)
            try:
                yield
            finally:
                graph.end_capture_to_conditional_node()

        return body()

    def _replay_mlp(self, i: int, x: torch.Tensor, replay: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        """MLP output (B, T, hidden) with replayed rows taken from ``prev``."""
        fns = self._fns
        if self.decision == "host":
            B, T, C = x.shape
            flat = replay.reshape(-1)
            keep = (~flat).nonzero().squeeze(1)  # the host sync of the reference
            self.host_replayed[i] += int(flat.numel() - keep.numel())
            if keep.numel() == flat.numel():
                return self._mlp(i, x)
            out = prev.reshape(-1, C).clone()
            if keep.numel():
                out.index_copy_(0, keep, self._mlp(i, x.reshape(-1, C).index_select(0, keep)))
            return out.view(B, T, C)
        if self.track:
            self.replayed[i] += replay.sum()
        if self.mlp == "triton":
            return self._predicated_mlp(i, x, replay, prev)
        if self.capacity is None:
            computed = torch.empty_like(x)
            with self._if((~replay).any()):
                computed.copy_(self._mlp(i, x))
            return fns["_select"](replay, prev, computed)
        B, T, C = x.shape
        N, cap = B * T, min(self.capacity, B * T)
        flat, xf, pf = replay.reshape(-1), x.reshape(-1, C), prev.reshape(-1, C)
        order, n_keep = _compact(flat)
        out = pf.clone()
        for lo, hi in ((0, cap), (cap, N)):
            if lo == hi:
                continue
            rows = order[lo:hi]
            valid = torch.arange(lo, hi, device=x.device) < n_keep
            computed = torch.empty(hi - lo, C, device=x.device, dtype=x.dtype)
            with self._if(n_keep > lo):
                computed.copy_(self._mlp(i, xf.index_select(0, rows)))
            out.index_copy_(0, rows, fns["_select"](~valid, pf.index_select(0, rows), computed))
        return out.view(B, T, C)

    def _predicated_mlp(self, i: int, x: torch.Tensor, replay: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        """MLP output (B, T, hidden) from the predicated Triton kernels: replayed rows keep ``prev`` (a
        fresh gather from the ring, written in place)."""
        mlp = self.layers[i].mlp
        weights = (mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)
        B, T, C = x.shape
        N = B * T
        flat, xf, out = replay.reshape(-1), x.reshape(-1, C), prev.reshape(-1, C)
        if N <= self._in_place_rows:  # one row tile holds every row: sorting could skip nothing more
            return self._predicated(xf, flat, *weights, out).view(B, T, C)
        order, n_keep = _compact(flat)
        past_count = torch.arange(N, device=x.device) >= n_keep  # the device-side count as a row mask
        done = self._predicated(xf.index_select(0, order), past_count, *weights, out.index_select(0, order))
        return out.index_copy_(0, order, done).view(B, T, C)

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, vocab) of ``ids`` (B, T) at positions ``pos .. pos + T - 1`` (``pos`` (1,) on the device)."""
        fns = self._fns
        B, T = ids.shape
        positions = pos + torch.arange(T, device=ids.device)  # (T,)
        cos, sin = self.cos.index_select(0, positions), self.sin.index_select(0, positions)
        mask = (self.key_pos[None, :] <= positions[:, None])[None, None]  # (1, 1, T, max_len)
        fastcar = self.decision != "none"
        if fastcar:
            P = self.P
            eligible = (positions >= P)[None].expand(B, T)
            # the earlier frame's cache slots, for the PyTorch decision (the Triton one reads the cache itself)
            k_slots = (positions - P).clamp(min=0) if self._decide_kernel is None else None
            slots = positions % P
        h = self.embed(ids)
        rep = self.H // self.KVH
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = fns["_rms"](h, layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon)
            if self._qkv is not None:
                q, k, v = F.linear(x, self._qkv[i]).split([self.H * self.D, self.KVH * self.D, self.KVH * self.D], -1)
            else:
                q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
            q = q.view(B, T, self.H, self.D)
            k = k.view(B, T, self.KVH, self.D)
            if getattr(attn, "q_norm", None) is not None:
                q, k = attn.q_norm(q), attn.k_norm(k)
            q = fns["_rope"](q.transpose(1, 2), cos, sin)
            k = fns["_rope"](k.transpose(1, 2), cos, sin)
            v = v.view(B, T, self.KVH, self.D).transpose(1, 2)
            kc, vc = self.k_cache[i], self.v_cache[i]
            if fastcar:
                if self._decide_kernel is not None:  # one launch (the PyTorch decision is nine small kernels)
                    tas, replay = self._decide_kernel(q, kc, positions, P, self.thr[i:i + 1], self.D**-0.5)
                else:
                    tas, replay = fns["_decide"](q, kc.index_select(2, k_slots), eligible, self.thr[i], self.D**-0.5)
                if self.tas_log is not None:
                    self.tas_log[i].append(tas[eligible].float().cpu())
            kc.index_copy_(2, positions, k)
            vc.index_copy_(2, positions, v)
            keys, values = kc, vc
            if rep > 1:
                keys = kc[:, :, None].expand(B, self.KVH, rep, self.max_len, self.D).reshape(B, self.H, self.max_len, self.D)
                values = vc[:, :, None].expand(B, self.KVH, rep, self.max_len, self.D).reshape(B, self.H, self.max_len, self.D)
            a = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scaling)
            h = h + attn.o_proj(a.transpose(1, 2).reshape(B, T, self.H * self.D))
            x = fns["_rms"](h, layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon)
            if not fastcar:
                m = self._mlp(i, x)
            else:
                ring = self.ring[i]
                prev = ring.index_select(1, slots)  # (B, T, hidden): the output one frame earlier
                m = self._replay_mlp(i, x, replay, prev)
                if self.log is not None:
                    self.log.append((i, replay.cpu()))
                if T <= P:
                    ring.index_copy_(1, slots, m)
                else:  # a long prefill: only the last frame stays in the ring
                    ring.index_copy_(1, slots[-P:], m[:, -P:])
            h = h + m
        h = fns["_rms"](h, self.norm.weight, self.norm.variance_epsilon)
        return self.lm_head(h)

    # ------------------------------------------------------------------------------------ decode loop
    def _step(self) -> None:
        """One greedy decode step on the static buffers (what the graph records)."""
        logits = self._forward(self.ids, self.pos)
        token = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        self.step_idx += 1
        self.out.index_copy_(1, self.step_idx, token)
        if self.use_teacher:
            self.ids.copy_(self.teacher.index_select(1, self.step_idx))
        else:
            self.ids.copy_(token)
        self.pos += 1

    def _warm_up(self, fn) -> None:
        """Run ``fn`` twice before a capture (cuBLAS handles, compiled and autotuned kernels, both sides of
        every conditional) without counting its replays.

        The warm-up decodes from whatever the buffers hold: a fresh decoder's key cache is zero, so every
        TAS is 0 and a layer with a threshold <= 0 replays every row. Counting those rows made the graph
        path report more replay than the eager one with the same tokens (H200: 119 vs 111 rows = 2 steps
        x batch 4 x the one layer with a negative threshold). Nothing else the warm-up writes is read
        before ``prefill`` (or the frame forward it repeats) writes it again.
        """
        replayed = self.replayed.clone()
        for _ in range(2):
            fn()
        self.replayed.copy_(replayed)

    def _capture(self, fn) -> torch.cuda.CUDAGraph:
        if self.decision == "host":
            raise ValueError("Expect decision 'none' or 'device' for a CUDA graph but got 'host' (it syncs)")
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._warm_up(fn)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        self._capturing = True
        try:
            with torch.cuda.graph(graph):
                fn()
        finally:
            self._capturing = False
        return graph

    def capture(self, rate: float | None = None) -> None:
        """Record one decode step as a CUDA graph (CUDA only); ``generate(graph=True)`` replays it.

        Args:
            rate: with ``mlp="auto"`` still to choose, the replay rate to time the MLP kernels at
                (default: the rate counted so far, ``stats()``; ``generate`` passes the rate of an
                uncaptured decode of its prompt).
        """
        if self.device.type != "cuda":
            raise RuntimeError(f"Expect a CUDA model to capture a CUDA graph but it is on {self.device}")
        if self._auto:
            rate = self.stats()["replay_rate"] if rate is None else rate
            if rate is None:
                raise ValueError("Expect a replay rate to choose mlp='auto' at: pass rate, or decode uncaptured first")
            self._choose_mlp(1, rate)
        self.pos.fill_(self.P or 0)
        self.step_idx.zero_()
        self.graphs[self.use_teacher] = self._capture(self._step)

    def prefill(self, prompt: torch.Tensor) -> None:
        """Fill the caches and the ring with ``prompt`` (B, T0) at positions 0..T0-1 (eager)."""
        B, T0 = prompt.shape
        if B != self.B:
            raise ValueError(f"Expect a prompt of batch {self.B} but got {B}")
        self.pos.zero_()
        self._count(0, T0)
        logits = self._forward(prompt, self.pos)
        token = logits[:, -1].argmax(-1, keepdim=True)
        self.out[:, :1] = token
        self.ids.copy_(self.teacher[:, :1] if self.use_teacher else token)
        self.pos.fill_(T0)
        self.step_idx.zero_()

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, new_tokens: int, teacher: torch.Tensor | None = None,
                 graph: bool | None = None) -> torch.Tensor:
        """Greedy tokens (B, new_tokens), as :func:`sparsevid.decoder.fastcar.generate` defines them.

        Args:
            graph: replay the captured decode step (captured on first use); default: on CUDA when the
                decision is not "host".
        """
        T0 = prompt.shape[1]
        if T0 + new_tokens > self.max_len:
            raise ValueError(f"Expect prompt + new_tokens <= max_len {self.max_len} but got {T0} + {new_tokens}")
        if graph is None:
            graph = self.device.type == "cuda" and self.decision != "host"
        if graph and (self.log is not None or self.tas_log is not None):
            raise ValueError("Expect graph=False while logging replay masks or TAS (logging reads the device)")
        self.use_teacher = teacher is not None
        if teacher is not None:
            self.teacher[:, :new_tokens] = teacher
        if graph and self.use_teacher not in self.graphs:
            rate = None
            if self._auto:  # the replay rate of this very decode, uncaptured (cuBLAS), for the MLP timing
                rate = self._measure_replay(lambda: self._decode(prompt, new_tokens, graph=False))
            self.capture(rate)
        return self._decode(prompt, new_tokens, graph)

    def _decode(self, prompt: torch.Tensor, new_tokens: int, graph: bool) -> torch.Tensor:
        """Prefill, then ``new_tokens - 1`` steps: replays of the captured step, or uncaptured."""
        T0 = prompt.shape[1]
        self.prefill(prompt)
        for _ in range(new_tokens - 1):
            self.graphs[self.use_teacher].replay() if graph else self._step()
        self._count(T0, new_tokens - 1)
        return self.out[:, :new_tokens].clone()

    @torch.no_grad()
    def decode_tas(self, prompt: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Greedy tokens (B, new_tokens) of one uncaptured decode and, per layer, the TAS of its eligible
        rows (float32, CPU): what per-layer quantile thresholds are taken from."""
        self.tas_log = [[] for _ in self.layers]
        try:
            tokens = self.generate(prompt, new_tokens, graph=False)
        finally:
            tas, self.tas_log = self.tas_log, None
        return tokens, [torch.cat(v) if v else torch.empty(0) for v in tas]

    # ------------------------------------------------------------------------------------ frame-parallel
    @torch.no_grad()
    def forward_frame(self, frame: torch.Tensor, start: int, graph: bool = False) -> torch.Tensor:
        """Greedy predictions (B, P) of one teacher-forced frame ``frame`` (B, P) at positions
        ``start .. start + P - 1`` (earlier frames already fed): B x P rows go through each layer together.

        With ``graph`` the frame forward is captured once (inputs ``self.frame_ids``/``self.frame_pos``)
        and replayed.
        """
        P = self.P
        if frame.shape != (self.B, P):
            raise ValueError(f"Expect a frame of shape {(self.B, P)} but got {tuple(frame.shape)}")
        if not hasattr(self, "frame_ids"):
            self.frame_ids = torch.zeros(self.B, P, dtype=torch.long, device=self.device)
            self.frame_pos = torch.zeros(1, dtype=torch.long, device=self.device)
            self.frame_out = torch.zeros(self.B, P, dtype=torch.long, device=self.device)
        self.frame_ids.copy_(frame)
        self.frame_pos.fill_(start)
        self._count(start, P)
        if graph:
            if self.frame_graph is None:  # warmed up on this very frame: repeating it rewrites the same values
                if self._auto:  # this frame's replay rate (counted once more, then uncounted)
                    self._choose_mlp(P, self._measure_replay(lambda: (self._count(start, P), self._frame_step())))
                self.frame_graph = self._capture(self._frame_step)
            self.frame_graph.replay()
        else:
            self._frame_step()
        return self.frame_out.clone()

    def _frame_step(self) -> None:
        self.frame_out.copy_(self._forward(self.frame_ids, self.frame_pos).argmax(-1))

    @torch.no_grad()
    def teacher_forced_frames(self, tokens: torch.Tensor, graph: bool = False) -> torch.Tensor:
        """Predictions (B, n*P - P) for frames 1..n-1 of ``tokens`` (B, n*P), frame 0 as the prompt."""
        P = self.P
        n = tokens.shape[1] // P
        self.pos.zero_()
        self._count(0, P)
        self._forward(tokens[:, :P], self.pos)
        return torch.cat([self.forward_frame(tokens[:, f * P : (f + 1) * P], f * P, graph=graph) for f in range(1, n)], 1)


# ---------------------------------------------------------------------------------------- calibration for agreement
@torch.no_grad()
def calibrate_agreement(model, prompts: torch.Tensor, tokens_per_frame: int, target_agreement: float, new_tokens: int, *,
                        step: float = 0.1, max_rate: float = 0.9, layers=None, floor: float | None = None,
                        graph: bool | None = None, fuse: bool = False) -> dict:
    """Per-layer thresholds with the most replay whose free-running token agreement on ``prompts`` is
    at least ``target_agreement``, and the agreement/replay frontier traced on the way.

    One no-replay decode records every layer's TAS; a layer's threshold for replay rate ``r`` is the
    ``1 - r`` quantile of its TAS. Greedy search: from no replay, every round tries raising each
    layer's rate by ``step`` (one decode of ``prompts`` per layer) and keeps the trial with the best
    agreement (ties: more replay). Layers whose replay costs agreement stay low, the others rise. The
    search stops below ``floor`` (default ``target_agreement - 0.15``) or when no layer can rise.

    Returns:
        dict: ``thresholds`` (one per decoder layer, the last point at or above the target; all
        ``inf`` if none), ``rates`` (per-layer target rates there), ``agreement``, ``replay``, and
        ``frontier``: list of ``{replay, agreement, rates}`` points (the search path, from (0, 1)).
    """
    n = len(decoder_layers(model))
    hooked = list(range(n) if layers is None else layers)
    if not 0 < target_agreement <= 1:
        raise ValueError(f"Expect target_agreement in (0, 1] but got {target_agreement!r}")
    floor = target_agreement - 0.15 if floor is None else floor
    B, T0 = prompts.shape
    # cuBLAS, not "auto": the thresholds and agreements found must not hang on which kernels a timing picked
    engine = StaticDecoder(model, B, T0 + new_tokens, tokens_per_frame, None, decision="device", mlp="cublas", fuse=fuse)
    reference, tas = engine.decode_tas(prompts, new_tokens)
    if any(not len(tas[i]) for i in hooked):
        raise ValueError(f"Expect prompts and new_tokens that decode tokens with a previous frame "
                         f"(prompt length + new_tokens > tokens_per_frame={tokens_per_frame})")

    def evaluate(rates):
        engine.set_thresholds([quantile_threshold(tas[i], rates[i]) if i in hooked else math.inf for i in range(n)])
        engine.reset_stats()
        tokens = engine.generate(prompts, new_tokens, graph=graph)
        return float((tokens == reference).float().mean()), engine.stats()["replay_rate"] or 0.0

    rates = [0.0] * n
    frontier = [dict(replay=0.0, agreement=1.0, rates=list(rates))]
    best = frontier[0]
    while True:
        trials = []
        for i in hooked:
            if rates[i] + step <= max_rate + 1e-9:
                trial = list(rates)
                trial[i] = round(trial[i] + step, 6)
                trials.append((*evaluate(trial), trial))
        if not trials:
            break
        agreement, replay, rates = max(trials, key=lambda t: (t[0], t[1]))
        point = dict(replay=replay, agreement=agreement, rates=list(rates))
        frontier.append(point)
        if agreement >= target_agreement and replay >= best["replay"]:
            best = point
        if agreement < floor:
            break
    thresholds = [quantile_threshold(tas[i], best["rates"][i]) if i in hooked else math.inf for i in range(n)]
    return dict(thresholds=thresholds, rates=best["rates"], agreement=best["agreement"], replay=best["replay"],
                frontier=frontier)


def plot_frontier(path: str, curves: dict[str, list[tuple[float, float]]], target: float | None = None,
                  title: str = "FastCar: token agreement vs MLP replay") -> None:
    """PNG of agreement (y) against replay rate (x), one line per named curve of ``(replay, agreement)`` points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    for name, points in curves.items():
        points = sorted(points)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", ms=3, label=name)
    if target is not None:
        ax.axhline(target, color="grey", ls="--", lw=0.8, label=f"agreement {target:g}")
    ax.set_xlabel("achieved MLP replay rate")
    ax.set_ylabel("free-running token agreement")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
