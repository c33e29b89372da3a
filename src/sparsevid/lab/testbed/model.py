"""The testbed model: a small Wan-style video DiT in pixel space, conditioned on a clip label.

Why this shape
--------------
- **diffusers' ``WanTransformer3DModel``** (not a look-alike), so :func:`sparsevid.apply` hooks it
  exactly as it hooks Wan2.1: same attention processor, same 3-D RoPE, same q/k RMSNorm, same
  token order (frame, row, column).
- **Pixel space, patch (1, 4, 4)**: no autoencoder to train or ship. A 16-frame 64x64 RGB clip is
  a 16x16x16 token grid = 4,096 video tokens, so self-attention is long enough for block sparsity
  to matter (32 blocks of 128 tokens: two 8x16 tiles per frame), while a forward still takes ~1-3 s
  on two CPU cores. Any frame count and any multiple of 4 in height/width works at inference
  (RoPE is computed per grid); tests run 4 frames of 32x32.
- **Label conditioning through cross-attention**: Wan cross-attends to text embeddings; here a
  learned table gives each label ``text_tokens`` embeddings of ``text_dim`` channels
  (:class:`LabelEmbedding`), fed as ``encoder_hidden_states``.
- **Size**: 4 blocks, width 128 (2 heads x 64; head dim 64 is what the Triton path is built
  for), FFN 512: ~1.2 M parameters, ~4.7 MB as float32 safetensors.

Flow matching convention (diffusers' ``FlowMatchEulerDiscreteScheduler``): ``x_s = (1 - s) x_0 + s
noise`` for ``s`` in [0, 1], ``timestep = 1000 s``, and the model predicts the velocity
``noise - x_0``. Pixels are scaled to [-1, 1].

Shape legend: ``B`` batch, ``C = 3`` RGB, ``F`` frames, ``H``/``W`` pixels, ``T`` label tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import data
from .motion import MOTION_DIMS

__all__ = [
    "TRANSFORMER_CONFIG", "LABEL_CONFIG", "LABELS", "SAMPLE", "WEIGHTS", "SPECS", "TestbedSpec", "get_spec",
    "LabelEmbedding", "build_transformer", "build_label_embedding", "save_weights", "load_weights",
]

LABELS: tuple[str, ...] = tuple(data.CLIPS)
"""Valid labels: one per bundled clip (``sparsevid.lab.data.CLIPS``)."""

TRANSFORMER_CONFIG = dict(
    patch_size=(1, 4, 4),
    num_attention_heads=2,
    attention_head_dim=64,
    in_channels=3,
    out_channels=3,
    text_dim=64,
    freq_dim=64,
    ffn_dim=512,
    num_layers=4,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=256,
)
"""``WanTransformer3DModel`` keyword arguments of the small testbed."""

LABEL_CONFIG = dict(num_labels=len(LABELS), text_tokens=4, text_dim=TRANSFORMER_CONFIG["text_dim"])

# native sample size (what the model was trained on) and the sampler's default shift
SAMPLE = dict(frames=16, height=64, width=64, shift=3.0)

WEIGHTS = Path(__file__).parent / "weights" / "testbed.safetensors"
"""The committed trained weights of the small testbed (transformer + label table, float32)."""


@dataclass(frozen=True)
class TestbedSpec:
    """One testbed: its model, its conditioning, its native sample size, its committed weights.

    ``small`` (the default) is the CPU-friendly model of the demo and the tests. ``large``
    ("testbed-l", issue 14) is sized so that attention can become as concentrated as in a real
    video DiT: 8 blocks x 4 heads x 64, 16 frames of 128x128 px = 16x32x32 = 16,384 video tokens,
    and conditioning on a label *and* a camera/object motion (:mod:`sparsevid.lab.testbed.motion`), so
    the model must track content across frames. Same diffusers class, same sampler, same contract.
    """

    __test__ = False  # not a pytest class despite the name

    name: str
    transformer: dict
    conditioning: dict
    sample: dict
    weights: Path
    short_side: int  # clips are resized to this short side for training


SPECS: dict[str, TestbedSpec] = {
    "small": TestbedSpec("small", TRANSFORMER_CONFIG, LABEL_CONFIG, SAMPLE, WEIGHTS, short_side=72),
    "large": TestbedSpec(
        "large",
        dict(TRANSFORMER_CONFIG, num_attention_heads=4, ffn_dim=768, num_layers=8),
        dict(LABEL_CONFIG, motion_dims=MOTION_DIMS, motion_tokens=4),
        dict(frames=16, height=128, width=128, shift=3.0),
        Path(__file__).parent / "weights" / "testbed_large.safetensors",
        short_side=240,
    ),
}
"""The testbeds by name (what ``load_pipeline(name=...)`` takes)."""


def get_spec(name: str) -> TestbedSpec:
    if name not in SPECS:
        raise ValueError(f"Expect name to be one of {sorted(SPECS)} but got {name!r}")
    return SPECS[name]


class LabelEmbedding(nn.Module):
    """The testbed's "text encoder": ``labels (B,) int64 [, motion (B, motion_dims)] -> (B, T, text_dim)``.

    A learned table gives each label ``text_tokens`` embeddings; with ``motion_dims > 0`` a linear
    map adds ``motion_tokens`` more from the motion vector (testbed-l). Fed as ``encoder_hidden_states``.
    """

    def __init__(self, num_labels: int, text_tokens: int, text_dim: int, motion_dims: int = 0, motion_tokens: int = 0):
        super().__init__()
        self.text_tokens, self.text_dim, self.motion_dims = text_tokens, text_dim, motion_dims
        self.table = nn.Embedding(num_labels, text_tokens * text_dim)
        nn.init.normal_(self.table.weight, std=1.0)
        self.motion = nn.Linear(motion_dims, motion_tokens * text_dim) if motion_dims else None

    def forward(self, labels: torch.Tensor, motion: torch.Tensor | None = None) -> torch.Tensor:
        tokens = self.table(labels).view(labels.shape[0], self.text_tokens, self.text_dim)
        if self.motion is None:
            return tokens
        if motion is None or motion.shape != (labels.shape[0], self.motion_dims):
            got = None if motion is None else tuple(motion.shape)
            raise ValueError(f"Expect motion of shape {(labels.shape[0], self.motion_dims)} but got {got}")
        extra = self.motion(motion.to(self.motion.weight.dtype)).view(labels.shape[0], -1, self.text_dim)
        return torch.cat([tokens, extra], dim=1)


def build_transformer(seed: int = 0, spec: TestbedSpec = SPECS["small"]):
    """A freshly initialised testbed ``WanTransformer3DModel`` (float32, CPU)."""
    from diffusers import WanTransformer3DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return WanTransformer3DModel(**spec.transformer)


def build_label_embedding(seed: int = 0, spec: TestbedSpec = SPECS["small"]) -> LabelEmbedding:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        return LabelEmbedding(**spec.conditioning)


def save_weights(path: str | Path, transformer, labels: LabelEmbedding, info: dict | None = None,
                 spec: TestbedSpec = SPECS["small"], dtype: torch.dtype = torch.float32) -> Path:
    """One safetensors file: ``transformer.*`` and ``labels.*`` tensors (``dtype``; testbed-l ships
    float16 to stay under 16 MB) plus JSON metadata naming the spec."""
    from safetensors.torch import save_file

    tensors = {f"transformer.{k}": v.detach().to(dtype).cpu().contiguous() for k, v in transformer.state_dict().items()}
    tensors.update({f"labels.{k}": v.detach().to(dtype).cpu().contiguous() for k, v in labels.state_dict().items()})
    metadata = {
        "testbed": spec.name,
        "transformer_config": json.dumps(spec.transformer),
        "label_config": json.dumps(spec.conditioning),
        "labels": json.dumps(list(LABELS)),
        "info": json.dumps(info or {}),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


def load_weights(path: str | Path | None = None, spec: TestbedSpec = SPECS["small"]):
    """``(transformer, label_embedding, metadata)`` from a file written by :func:`save_weights`
    (CPU, float32; ``path`` defaults to the spec's committed weights)."""
    from safetensors import safe_open

    path = Path(path or spec.weights)
    if not path.is_file():
        raise FileNotFoundError(
            f"Expect the testbed weights at {path} but the file is missing; train them with "
            f"`python -m sparsevid.lab.testbed.train --testbed {spec.name}` (or pass a path)"
        )
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k).float() for k in f.keys()}
    saved = json.loads(metadata.get("transformer_config", "{}"))
    if saved and {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()} != spec.transformer:
        raise ValueError(f"Expect weights for the {spec.name} testbed ({spec.transformer}) but {path} holds {saved}")
    transformer = build_transformer(spec=spec)
    labels = build_label_embedding(spec=spec)
    transformer.load_state_dict({k[len("transformer.") :]: v for k, v in tensors.items() if k.startswith("transformer.")})
    labels.load_state_dict({k[len("labels.") :]: v for k, v in tensors.items() if k.startswith("labels.")})
    return transformer, labels, {k: json.loads(v) if k != "testbed" else v for k, v in metadata.items()}
