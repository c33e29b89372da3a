"""The model registry: what sparsevid must know about each video transformer class.

One :class:`ModelSpec` per class (keyed by class name, so the registry needs no import of the
framework that defines it): which modules are the video self-attention layers, how the latent
token grid and the diffusion timestep are read from a forward call (its arguments bound to the
forward's signature, so positional and keyword calls read the same), where non-video tokens sit
in the self-attention sequence, and which (self-attention, FFN) pairs token replay may touch. The
diffusers hooks (:mod:`sparsevid.integrations.diffusers`), :mod:`sparsevid.reuse` and
:mod:`sparsevid.lab.eval` all read it. Classes sparsevid cannot serve are listed in :data:`REFUSED`
with the reason a user is told.

Shape legend: ``(F, H, W)`` is the token grid after patchify; ``L`` the self-attention sequence.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

__all__ = ["ModelSpec", "REFUSED", "TileOrderPoints", "bind_call", "model_spec", "register_model", "supported_models"]

Call = Mapping[str, Any]  # a forward call's arguments by parameter name


@dataclass(frozen=True)
class ModelSpec:
    """How sparsevid reads one transformer class.

    Attributes:
        self_attention: ``model -> [module, ...]``: the video self-attention modules, in depth order
            (``dense_layers`` counts along this list).
        grid: ``(model, call) -> (F, H, W)``: the token grid of this forward call.
        timestep (str): the forward parameter holding the diffusion time (any shape; its maximum is read).
        others (str | None): where non-video tokens (text, image, history) sit in the self-attention
            sequence: ``"first"``, ``"last"``, or ``None`` (video tokens only). They are attended densely.
        refuse_model: ``model -> reason | None``: a configuration sparsevid cannot serve (checked at apply).
        refuse_call: ``call -> reason | None``: a forward call it cannot serve (checked per call).
        replay: ``model -> [(self_attention, ffn), ...]`` per block for token replay
            (:class:`sparsevid.reuse.TokenReplay`): the attention's ``norm_q``/``norm_k`` outputs are
            ``(B, L, heads * head_dim)`` over video tokens only. ``None``: not supported.
        tile_order: where the model can keep its video tokens in tile order from the patch embedding
            to the output projection, so no attention call gathers: ``model -> TileOrderPoints``
            (``None``: not supported); ``tile_order_call(call)`` says whether a call allows it.
        framework (str): ``"diffusers"`` or ``"comfyui"``: which adapter serves the class.
    """

    self_attention: Callable[[torch.nn.Module], list[torch.nn.Module]]
    grid: Callable[[torch.nn.Module, Call], tuple[int, int, int]]
    timestep: str = "timestep"
    others: str | None = None
    refuse_model: Callable[[torch.nn.Module], str | None] | None = None
    refuse_call: Callable[[Call], str | None] | None = None
    replay: Callable[[torch.nn.Module], list[tuple[torch.nn.Module, torch.nn.Module]]] | None = None
    tile_order: Callable[[torch.nn.Module], "TileOrderPoints"] | None = None
    tile_order_call: Callable[[Call], bool] = lambda call: True
    framework: str = "diffusers"  # whose model class this is: "diffusers" or "comfyui"


@dataclass(frozen=True)
class TileOrderPoints:
    """The three modules around which a model's video tokens can travel in tile order.

    Attributes:
        embed: the patch embedding; its output ``(B, C, F, H, W)`` is flattened to the token
            sequence by the forward (``flatten(2)``), so it is returned as ``(B, C, 1, 1, L)`` in tile order.
        positions: the module whose output is the per-token rotary tables (a tuple of ``(1, L, 1, D)``
            tensors): permuted the same way.
        out: the output projection; its output ``(B, L, C)`` goes back to raster order.
    """

    embed: torch.nn.Module
    positions: torch.nn.Module
    out: torch.nn.Module


_MODELS: dict[str, ModelSpec] = {}

REFUSED: dict[str, str] = {
    "HunyuanVideoFramepackTransformer3DModel": "its self-attention joins history-frame tokens before the video and "
    "image/text tokens after it (two runs of other tokens), which sparsevid's layouts do not describe",
    "Kandinsky6SRTransformer3DModel": "it already runs its own NABLA sparse attention (flex backend, 8x8-tile token "
    "order)",
    "MiniMaxH3Transformer3DModel": "it attends over one caller-packed sequence of text, conditioning, audio and video "
    "rows placed by index tensors: there is no video grid in raster order to plan over",
    "JoyImageEditPlusTransformer3DModel": "its inputs are pre-patchified and padded per sample (grids come from "
    "shape_list), so the sequence is not one video grid",
    "LatteTransformer3DModel": "it splits attention into per-frame spatial and per-pixel temporal attentions: there "
    "is no full video attention to make sparse",
    "SanaVideoTransformer3DModel": "its self-attention is linear attention (already O(L)): there is no softmax "
    "attention map to skip blocks of",
    "SanaWMLTX2RefinerTransformer3DModel": "it denoises a few frames at a time against a cached window of earlier "
    "frames (queries are not keys, no frame grid given): not a full-video self-attention",
    "WanAnimate2Transformer3DModel": "it attends the video jointly with cached reference-video keys through its own "
    "flex block mask: there is no plain video self-attention to make sparse",
    "AnyFlowFARTransformer3DModel": "it generates chunk by chunk with causal flex block masks, a KV cache and "
    "mixed-resolution context tokens: its self-attention is not a plain video grid",
    "TransformerTemporalModel": "it is a UNet's temporal-only attention (one pixel's frames), not a video DiT",
}


def register_model(name: str, spec: ModelSpec) -> ModelSpec:
    """Register ``spec`` for the transformer class called ``name`` (rejects duplicates)."""
    if name in _MODELS:
        raise ValueError(f"Expect a new model class name but {name!r} is already registered")
    _MODELS[name] = spec
    return spec


def supported_models(framework: str = "diffusers") -> list[str]:
    """Transformer class names sparsevid supports in ``framework`` (``"diffusers"``, ``"comfyui"``), sorted."""
    return sorted(name for name, spec in _MODELS.items() if spec.framework == framework)


def model_spec(model: torch.nn.Module, framework: str = "diffusers") -> ModelSpec:
    """The registry entry of ``model``'s class.

    Raises:
        ValueError: a refused class (with the reason), a refused configuration, or an unknown class
            (listing the supported ones).
    """
    name = type(model).__name__
    if name in REFUSED:
        raise ValueError(f"sparsevid does not support {name}: {REFUSED[name]}")
    if name not in _MODELS or _MODELS[name].framework != framework:
        raise ValueError(f"Expect a {framework} transformer of {supported_models(framework)} but got {name}")
    spec = _MODELS[name]
    reason = spec.refuse_model(model) if spec.refuse_model is not None else None
    if reason is not None:
        raise ValueError(f"sparsevid does not support this {name}: {reason}")
    return spec


def bind_call(model: torch.nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """``model.forward``'s arguments by parameter name (defaults filled in), positional or keyword alike."""
    signature = inspect.signature(type(model).forward)
    bound = signature.bind(model, *args, **kwargs)
    bound.apply_defaults()
    out = dict(bound.arguments)
    out.pop(next(iter(signature.parameters)))  # self
    return out


# ---------------------------------------------------------------------------------------- grids
def _patch(config) -> tuple[int, int, int]:
    """``(pt, ph, pw)`` from a config's ``patch_size`` (int or triple) and ``patch_size_t``."""
    patch = config.patch_size
    if isinstance(patch, (tuple, list)):
        return tuple(int(p) for p in patch)
    return (getattr(config, "patch_size_t", None) or 1, patch, patch)


def _grid_of(f: int, h: int, w: int, patch: tuple[int, int, int], ceil: bool = False) -> tuple[int, int, int]:
    div = (lambda a, b: math.ceil(a / b)) if ceil else (lambda a, b: a // b)
    return (div(f, patch[0]), div(h, patch[1]), div(w, patch[2]))


def channels_first(arg: str = "hidden_states") -> Callable:
    """Grid of a ``(B, C, F, H, W)`` latent."""
    return lambda model, call: _grid_of(*call[arg].shape[-3:], _patch(model.config))


def frames_first(ceil: bool = False) -> Callable:
    """Grid of a ``(B, F, C, H, W)`` latent (CogVideoX 1.5 pads odd frames up to its temporal patch)."""

    def grid(model, call):
        x = call["hidden_states"]
        return _grid_of(x.shape[1], x.shape[-2], x.shape[-1], _patch(model.config), ceil)

    return grid


def channels_last(model, call) -> tuple[int, int, int]:
    """Grid of a channels-last ``(B, F, H, W, C)`` latent (Kandinsky)."""
    return _grid_of(*call["hidden_states"].shape[1:4], _patch(model.config))


def from_sizes(patched: bool) -> Callable:
    """Grid from the ``num_frames``/``height``/``width`` arguments of a pre-packed ``(B, L, C)`` latent:
    already in tokens (LTX), or in latent units to divide by the patch sizes, rounding up (LTX-2)."""

    def grid(model, call):
        sizes = [call.get(name) for name in ("num_frames", "height", "width")]
        if any(s is None for s in sizes):
            raise ValueError(
                f"Expect num_frames, height and width in the {type(model).__name__} call (sparsevid reads the token "
                "grid from them) but got None; video_coords alone (LTXConditionPipeline) is NYI"
            )
        return _grid_of(*(int(s) for s in sizes), _patch(model.config) if patched else (1, 1, 1), ceil=True)

    return grid


def _joy_grid(model, call) -> tuple[int, int, int]:
    x = call["hidden_states"]
    if x.dim() == 6:  # (B, items, C, T, H, W): the items are stacked along frames
        f = x.shape[1] * x.shape[3]
        return _grid_of(f, x.shape[-2], x.shape[-1], _patch(model.config))
    return _grid_of(*x.shape[-3:], _patch(model.config))


# ---------------------------------------------------------------------------------------- refusals
_REFUSAL_NOTES: dict[Callable, str] = {}  # refusal check -> when it refuses (for the README table)


def _refuse_mask(arg: str, what: str) -> Callable[[Call], str | None]:
    def refuse(call):
        return f"{what} ({arg} given)" if call.get(arg) is not None else None

    _REFUSAL_NOTES[refuse] = f"`{arg}` is given ({what})"
    return refuse


def _refuse_skyreels(model) -> str | None:
    if getattr(model.config, "num_frame_per_block", 1) > 1:
        return ("diffusion forcing with num_frame_per_block > 1 adds a block-causal attention mask that block-sparse "
                "plans do not honour")
    return None


_REFUSAL_NOTES[_refuse_skyreels] = "`num_frame_per_block > 1` (diffusion forcing: a block-causal mask)"


# ---------------------------------------------------------------------------------------- entries
def _attn1(blocks: str = "blocks") -> Callable:
    return lambda m: [b.attn1 for b in getattr(m, blocks)]


def _wan_replay(m) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
    return [(b.attn1, b.ffn) for b in m.blocks]


def _wan_tile_order(m) -> TileOrderPoints:
    return TileOrderPoints(embed=m.patch_embedding, positions=m.rope, out=m.proj_out)


def _per_sample_timestep(call) -> bool:
    # Wan 2.2 TI2V gives every token its own timestep (modulation per token, in raster order)
    return getattr(call.get("timestep"), "ndim", 1) < 2


register_model("WanTransformer3DModel", ModelSpec(_attn1(), channels_first(), replay=_wan_replay,
                                                  tile_order=_wan_tile_order, tile_order_call=_per_sample_timestep))
_WAN = ModelSpec(_attn1(), channels_first(), replay=_wan_replay)
for _name in ("ChronoEditTransformer3DModel", "WanAnimateTransformer3DModel"):
    register_model(_name, _WAN)
register_model("SkyReelsV2Transformer3DModel", ModelSpec(
    _attn1(), channels_first(), refuse_model=_refuse_skyreels, replay=_wan_replay,
))
register_model("WanVACETransformer3DModel", ModelSpec(
    lambda m: [b.attn1 for b in m.vace_blocks] + [b.attn1 for b in m.blocks], channels_first(),
))
register_model("AnyFlowTransformer3DModel", ModelSpec(_attn1(), frames_first()))
register_model("HeliosTransformer3DModel", ModelSpec(_attn1(), channels_first(), others="first"))
register_model("HunyuanVideoTransformer3DModel", ModelSpec(
    lambda m: [b.attn for b in m.transformer_blocks] + [b.attn for b in m.single_transformer_blocks],
    channels_first(), others="last",
))
register_model("HunyuanVideo15Transformer3DModel", ModelSpec(
    lambda m: [b.attn for b in m.transformer_blocks], channels_first(), others="last",
))
register_model("MotifVideoTransformer3DModel", ModelSpec(
    # the decoder single blocks attend [video, encoder-output video]: left dense (see README)
    lambda m: [b.attn for b in m.transformer_blocks]
    + [b.attn for b in m.single_transformer_blocks[: len(m.single_transformer_blocks) - m.config.num_decoder_layers]],
    channels_first(), others="last",
))
register_model("CogVideoXTransformer3DModel", ModelSpec(
    _attn1("transformer_blocks"), frames_first(ceil=True), others="first",
))
register_model("ConsisIDTransformer3DModel", ModelSpec(_attn1("transformer_blocks"), frames_first(), others="first"))
register_model("EasyAnimateTransformer3DModel", ModelSpec(_attn1("transformer_blocks"), channels_first(),
                                                           others="first"))
register_model("LTXVideoTransformer3DModel", ModelSpec(_attn1("transformer_blocks"), from_sizes(patched=False)))
register_model("LTX2VideoTransformer3DModel", ModelSpec(
    _attn1("transformer_blocks"), from_sizes(patched=True),
    refuse_call=_refuse_mask("video_self_attention_mask", "a full video self-attention mask (IC-LoRA) is NYI"),
))
register_model("MochiTransformer3DModel", ModelSpec(_attn1("transformer_blocks"), channels_first(), others="last"))
register_model("CosmosTransformer3DModel", ModelSpec(_attn1("transformer_blocks"), channels_first()))
register_model("AllegroTransformer3DModel", ModelSpec(_attn1("transformer_blocks"), channels_first()))
register_model("Kandinsky5Transformer3DModel", ModelSpec(
    lambda m: [b.self_attention for b in m.visual_transformer_blocks], channels_last,
    refuse_call=_refuse_mask("sparse_params", "the model's own NABLA sparse attention is on"),
))
register_model("Kandinsky6Transformer3DModel", ModelSpec(
    lambda m: [b.video_dec_block.self_attention for b in m.visual_transformer_blocks], channels_last,
))
register_model("JoyImageEditTransformer3DModel", ModelSpec(lambda m: [b.attn for b in m.double_blocks], _joy_grid,
                                                            others="last"))
register_model("SanaWMTransformer3DModel", ModelSpec(
    # only every softmax_every_n-th block has softmax attention; the others are linear (gated delta-net)
    lambda m: [b.attn.attn for i, b in enumerate(m.blocks) if (i + 1) % m.config.softmax_every_n == 0],
    channels_first(),
))


def markdown_table() -> str:
    """The supported and refused classes as README tables (``python -m sparsevid models``)."""
    rows = ["| class | other tokens in self-attention | tile order through the model | token replay | refused when |",
            "|---|---|---|---|---|"]
    for name in supported_models("diffusers"):
        spec = _MODELS[name]
        refusals = [r for r in (spec.refuse_model, spec.refuse_call) if r is not None]
        when = "; ".join(sorted(_REFUSAL_NOTES.get(r, r.__name__) for r in refusals)) or "-"
        rows.append(f"| `{name}` | {spec.others or 'none'} | {'yes' if spec.tile_order else 'no'} "
                    f"| {'yes' if spec.replay else 'no'} | {when} |")
    rows += ["", "| refused class | why |", "|---|---|"]
    rows += [f"| `{name}` | {reason} |" for name, reason in sorted(REFUSED.items())]
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------- ComfyUI's models
def comfy_grid(model, call) -> tuple[int, int, int]:
    """Grid of ComfyUI's video models: ``x`` ``(B, C, F, H, W)`` and the model's ``patch_size`` triple."""
    return _grid_of(*call["x"].shape[-3:], tuple(int(p) for p in model.patch_size))


def _comfy_wan_attention(m) -> list[torch.nn.Module]:
    return [b.self_attn for b in getattr(m, "vace_blocks", [])] + [b.self_attn for b in m.blocks]


# ComfyUI's Wan 2.1/2.2 (t2v, i2v, fun, VACE, camera): a reference latent may come first in the sequence.
for _name in ("WanModel", "VaceWanModel", "CameraWanModel"):
    register_model(_name, ModelSpec(_comfy_wan_attention, comfy_grid, timestep="timestep", others="first",
                                    framework="comfyui"))
register_model("HunyuanVideo", ModelSpec(  # ComfyUI's HunyuanVideo: [video, text] joint attention, text key padding
    lambda m: [*m.double_blocks, *m.single_blocks], comfy_grid, others="last", framework="comfyui",
))
