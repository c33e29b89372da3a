"""``TestbedPipeline``: label -> video with the trained testbed DiT and a flow-matching Euler sampler.

It has what :func:`sparsevid.apply` reads from a diffusers pipeline: ``.transformer`` (a
``WanTransformer3DModel``) and ``.scheduler`` (a ``FlowMatchEulerDiscreteScheduler`` whose
``timesteps`` give the step index), so ``sv.apply(tb, method="draft", density=0.1)`` works as on
Wan2.1.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from .model import LABELS, SPECS, TestbedSpec, get_spec, load_weights
from .motion import Motion

__all__ = ["TestbedPipeline", "load_pipeline"]


class TestbedPipeline:
    """Generate a video of a clip label.

    Attributes:
        transformer: the ``WanTransformer3DModel`` (eval mode, no grad).
        scheduler: ``FlowMatchEulerDiscreteScheduler(shift=3.0)``.
        label_embedding: ``LabelEmbedding`` (label index -> ``encoder_hidden_states``).
        labels (tuple[str, ...]): valid values of ``label``.
        device, dtype: where and in what precision it runs (float32 on CPU, bfloat16 on CUDA).
        info (dict): how the weights were trained (command, device, date, final loss, ...).
    """

    __test__ = False  # not a pytest class despite the name

    def __init__(self, transformer, label_embedding, scheduler, device, dtype, info=None, spec: TestbedSpec = SPECS["small"]):
        self.transformer = transformer
        self.label_embedding = label_embedding
        self.scheduler = scheduler
        self.device = torch.device(device)
        self.dtype = dtype
        self.labels: tuple[str, ...] = LABELS
        self.info = info or {}
        self.spec = spec

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.transformer.parameters())
        return f"TestbedPipeline({self.spec.name!r}, labels={list(self.labels)}, params={n / 1e6:.2f}M, device={self.device}, dtype={self.dtype})"

    def encode_label(self, label: str, batch: int = 1, motion: Motion | None = None) -> torch.Tensor:
        """``encoder_hidden_states`` ``(batch, T, text_dim)`` for ``label`` (and, on testbed-l, ``motion``)."""
        if label not in self.labels:
            raise ValueError(f"Expect label to be one of {list(self.labels)} but got {label!r}")
        index = torch.full((batch,), self.labels.index(label), dtype=torch.long, device=self.device)
        vector = None
        if self.label_embedding.motion is not None:
            motion = (motion or Motion()).check(len(self.labels))
            vector = motion.vector(len(self.labels)).to(self.device).expand(batch, -1)
        elif motion is not None:
            raise ValueError(f"Expect motion=None: the {self.spec.name} testbed is conditioned on the label only")
        with torch.no_grad():
            return self.label_embedding(index, vector).to(self.dtype)

    @staticmethod
    def initial_noise(seed: int, frames: int, height: int, width: int) -> torch.Tensor:
        """The starting latent ``(1, 3, F, H, W)``: float32 from a CPU generator, same on every device."""
        g = torch.Generator("cpu").manual_seed(int(seed))
        return torch.randn((1, 3, frames, height, width), generator=g, dtype=torch.float32)

    @torch.no_grad()
    def __call__(
        self,
        label: str,
        seed: int = 0,
        steps: int = 20,
        frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        progress: bool = True,
        motion: Motion | None = None,
        callback=None,
    ) -> torch.Tensor:
        """Sample one video.

        Args:
            label (str): one of :attr:`labels`.
            seed (int): seed of the initial noise (CPU generator: the same noise on every device).
            steps (int): Euler steps of the flow-matching sampler.
            frames, height, width (int): output size; height and width multiples of 4 (the patch).
                Default: the native size (small: 16 x 64 x 64, large: 16 x 128 x 128); fewer frames /
                smaller frames work (tests).
            progress (bool): show a tqdm bar over the steps.
            callback: optional ``callback(step, timestep, latents)`` after every step.
            motion (Motion): testbed-l only: how the content moves (default: a still centred view).

        Returns:
            torch.Tensor: float32 ``(F, 3, H, W)`` in [0, 1] on the CPU.
        """
        frames = self.spec.sample["frames"] if frames is None else frames
        height = self.spec.sample["height"] if height is None else height
        width = self.spec.sample["width"] if width is None else width
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise ValueError(f"Expect seed to be an int in [0, 2**63) but got {seed!r}")
        for name, value in (("steps", steps), ("frames", frames), ("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Expect {name} to be an int >= 1 but got {value!r}")
        for name, value in (("height", height), ("width", width)):
            if value % 4:
                raise ValueError(f"Expect {name} to be a multiple of 4 (the patch size) but got {value}")
        cond = self.encode_label(label, motion=motion)
        latents = self.initial_noise(seed, frames, height, width).to(self.device, self.dtype)
        self.scheduler.set_timesteps(steps, device=self.device)
        self._reset_hooks()
        for i, t in enumerate(tqdm(self.scheduler.timesteps, desc=f"{label} seed {seed}", unit="step", leave=False, disable=not progress)):
            # one guidance branch, named as diffusers pipelines name it, so step caches (enable_cache) work
            with self.transformer.cache_context("cond"):
                velocity = self.transformer(
                    hidden_states=latents, timestep=t.expand(1), encoder_hidden_states=cond, return_dict=False
                )[0]
            # Euler in float32 (the scheduler upcasts), back to the model dtype for the next forward
            latents = self.scheduler.step(velocity, t, latents, return_dict=False)[0].to(self.dtype)
            if callback is not None:
                callback(i, t, latents)
        self._reset_hooks()
        video = latents[0].float().clamp(-1, 1).add(1).div(2)  # (3, F, H, W)
        return video.permute(1, 0, 2, 3).contiguous().cpu()

    def _reset_hooks(self) -> None:
        # as a diffusers pipeline does after each call: stateful hooks (sparsevid's step counter) start over
        registry = getattr(self.transformer, "_diffusers_hook", None)
        if registry is not None:
            registry.reset_stateful_hooks(recurse=True)

    def to(self, device=None, dtype=None) -> "TestbedPipeline":
        if device is not None:
            self.device = torch.device(device)
        if dtype is not None:
            self.dtype = dtype
        cast_transformer(self.transformer, self.device, self.dtype)
        self.label_embedding.to(self.device)
        return self


def cast_transformer(transformer, device, dtype):
    """``transformer.to(device, dtype)`` keeping the modules diffusers keeps in float32 (norms, RoPE,
    time embedder, modulation table), as ``from_pretrained(torch_dtype=...)`` does."""
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # the "should be kept in float32" warning: we do keep them
    try:
        transformer.to(device, dtype)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    keep = getattr(transformer, "_keep_in_fp32_modules", None) or []
    if dtype != torch.float32 and keep:
        for name, module in transformer.named_modules():
            if any(k in name.split(".") for k in keep):
                module.to(torch.float32)
        for name, param in transformer.named_parameters():
            if any(k in name.split(".") for k in keep):
                param.data = param.data.float()
    return transformer


def load_pipeline(device=None, dtype: torch.dtype | None = None, weights: str | Path | None = None,
                  name: str = "small") -> TestbedPipeline:
    """The trained testbed, ready to sample.

    Args:
        device: ``None`` = CUDA when available, else CPU.
        dtype: ``None`` = bfloat16 on CUDA (what the Triton kernels take), float32 elsewhere.
        weights: a safetensors file from the training script (default: the committed weights).
        name: ``"small"`` (the CPU-friendly model of the demo and tests) or ``"large"`` (testbed-l:
            16,384 video tokens, conditioned on label and :class:`Motion`; meant for a GPU).

    Returns:
        TestbedPipeline
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    spec = get_spec(name)
    transformer, labels, metadata = load_weights(weights, spec)
    transformer = cast_transformer(transformer, device, dtype).eval().requires_grad_(False)
    labels = labels.to(device).eval().requires_grad_(False)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=spec.sample["shift"])
    return TestbedPipeline(transformer, labels, scheduler, device, dtype, info=metadata.get("info"), spec=spec)
