"""How much attention mass can a sparse plan keep on the testbed? (``python scripts/oracle_mass.py``)

Captures q/k of every video self-attention layer of the testbed at one denoising step (the first
sparse step under the default warm-up) and reports, per tile size, the mass of a query row's
attention that an *oracle* keeps at a given density: for each query block the key blocks with the
most mass summed over that block's rows (what a block plan can choose), for ``token`` each row's
own best keys. Also the row entropy (fraction of ``log L``) and the share of mass in the row's frame.
"""

from __future__ import annotations

import argparse
import math

import torch

from sparsevid import VideoLayout, testbed
from sparsevid.eval import LayerCapture


def oracle_mass(p: torch.Tensor, layout: VideoLayout | None, density: float) -> float:
    """Mean kept mass per row of ``p`` ``(L, L)`` (rows sum to 1) under an oracle plan."""
    L = p.shape[0]
    if layout is None:  # token level
        k = max(1, round(density * L))
        return float(p.topk(k, dim=-1).values.sum(-1).mean())
    blocks = layout.on(p.device).block_of_token  # (L,)
    nb = layout.num_blocks
    row_block = torch.zeros(L, nb, dtype=p.dtype).index_add_(1, blocks, p)  # mass of each row per key block
    per_block = torch.zeros(nb, nb, dtype=p.dtype).index_add_(0, blocks, row_block)  # summed over query block
    k = max(1, round(density * nb))
    keep = per_block.topk(k, dim=-1).indices  # (nb, k) per query block
    kept = row_block.gather(1, keep[blocks])  # (L, k)
    return float(kept.sum(-1).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--label", default="bikes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--block-sizes", type=int, nargs="+", default=[128, 64, 32, 16])
    args = parser.parse_args()

    pipe = testbed.load_pipeline(device="cpu")
    capture = LayerCapture(pipe.transformer, step=math.ceil(0.2 * args.steps))
    pipe(label=args.label, seed=args.seed, steps=args.steps, progress=False)
    capture.remove()
    F_, H, W = capture.grid
    columns = [f"{bs}-token blocks" for bs in args.block_sizes] + ["token"]
    print(f"testbed '{args.label}' seed {args.seed}, step {capture.step} of {args.steps}, grid {F_}x{H}x{W}, "
          f"density {args.density}: oracle mass kept per layer x head")
    print(f"{'layer.head':>10} " + " ".join(f"{c:>16}" for c in columns) + f" {'entropy/logL':>13} {'own frame':>10}")
    totals = [[] for _ in columns]
    for layer, (q, k, _, scale) in enumerate(capture.layers):
        scale = scale or q.shape[-1] ** -0.5
        for head in range(q.shape[1]):
            p = torch.softmax(q[0, head].float() @ k[0, head].float().T * scale, dim=-1)
            values = [oracle_mass(p, VideoLayout(F_, H, W, block_size=bs), args.density) for bs in args.block_sizes]
            values.append(oracle_mass(p, None, args.density))
            for t, v in zip(totals, values):
                t.append(v)
            entropy = float(-(p * p.clamp_min(1e-30).log()).sum(-1).mean()) / math.log(p.shape[0])
            frame = torch.arange(p.shape[0]) // (H * W)
            own = float((p * (frame[:, None] == frame[None, :])).sum(-1).mean())
            print(f"{layer}.{head:<8} " + " ".join(f"{v:16.3f}" for v in values) + f" {entropy:13.2f} {own:10.2f}")
    print(f"{'mean':>10} " + " ".join(f"{sum(t) / len(t):16.3f}" for t in totals))


if __name__ == "__main__":
    main()
