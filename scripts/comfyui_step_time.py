"""One denoising step of ComfyUI's own Wan model, dense vs through the "SparseVid Attention" node (GPU).

    COMFYUI_PATH=/path/to/ComfyUI python scripts/comfyui_step_time.py [--density 0.1] [--reps 5]

The model is ComfyUI's ``WanModel`` with the published Wan2.1-1.3B configuration and random weights
(no checkpoint), bf16, at the 480p latent of 81 frames (21 x 60 x 104, 32,760 tokens), batch 2 (ComfyUI
runs the two guidance branches as one batch). The step is a diffusion-model forward with the
``transformer_options`` ComfyUI's sampler gives it (wrappers, ``sample_sigmas`` of a 30-step schedule,
the ``sigmas`` of step 10, so that the node's default 20% warm-up is over). Timings: CUDA events,
warm-up, median of ``--reps``. Appends a table to ``--benchmarks-md``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--benchmarks-md", default=str(ROOT / "BENCHMARKS.md"))
    parser.add_argument("--smoke", action="store_true", help="a 2-layer model on the CPU (checks the script, no timing claim)")
    args = parser.parse_args()
    comfy_path = os.environ.get("COMFYUI_PATH")
    if comfy_path:
        sys.path.insert(0, comfy_path)
    sys.path.insert(0, str(ROOT))  # the node folder
    sys.path.insert(0, str(ROOT / "src"))
    import comfy.cli_args

    comfy.cli_args.args.cpu = args.smoke  # read when comfy.model_management is first imported
    import comfy.model_patcher
    import comfy.patcher_extension
    import comfy.supported_models

    from comfyui_sparsevid import NODE_CLASS_MAPPINGS
    from sparsevid.lab.bench.common import append_benchmarks, environment, markdown_table, time_ms
    from sparsevid.integrations.comfyui import sparse_session

    device, dtype = (torch.device("cpu"), torch.float32) if args.smoke else (torch.device("cuda"), torch.bfloat16)
    dims = dict(dim=64, ffn_dim=128, freq_dim=32, text_dim=4096, num_heads=2, num_layers=2) if args.smoke else dict(
        dim=1536, ffn_dim=8960, freq_dim=256, text_dim=4096, num_heads=12, num_layers=30)
    config = comfy.supported_models.WAN21_T2V(dict(
        image_model="wan2.1", model_type="t2v", patch_size=(1, 2, 2), text_len=512, in_dim=16, out_dim=16, **dims))
    config.set_inference_dtype(dtype, None)
    torch.manual_seed(0)
    model = config.get_model({}, device=device)
    model.diffusion_model.to(device, dtype)
    model.diffusion_model.patch_embedding.float()  # ComfyUI's Wan feeds it float32 (x.float())
    with torch.no_grad():  # ComfyUI's disable_weight_init leaves weights uninitialised
        for name, p in model.diffusion_model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.02)
            else:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
    native = comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)
    patched = NODE_CLASS_MAPPINGS["SparseVidAttention"]().patch(native, "draft", "density", args.density, 0.2, 1, 1,
                                                                "auto")[0]
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(2, 16, *((3, 10, 14) if args.smoke else (21, 60, 104)), generator=g, device=device, dtype=dtype)
    context = torch.randn(2, 512, 4096, generator=g, device=device, dtype=dtype)
    sigmas = torch.linspace(1.0, 0.0, 31, device=device)
    step = 10
    timestep = (sigmas[step] * 1000).expand(2)

    def options(patcher):
        to = dict(patcher.model_options.get("transformer_options", {}))
        to["wrappers"] = patcher.wrappers
        to["sample_sigmas"], to["sigmas"] = sigmas, sigmas[step].expand(2)
        return to

    def forward(patcher):
        with torch.no_grad():
            return model.diffusion_model(x, timestep, context, transformer_options=options(patcher))

    rows = []
    dense_ms = time_ms(lambda: forward(native), reps=args.reps, warmup=2, device=device.type)
    sparse_ms = time_ms(lambda: forward(patched), reps=args.reps, warmup=2, device=device.type)
    stats = sparse_session(patched).stats()
    rows.append(["dense (ComfyUI's attention: PyTorch SDPA)", "1", f"{dense_ms:.1f}", "1.00x"])
    rows.append([f"SparseVid Attention node, draft, dense_layers 1", f"{args.density:g}", f"{sparse_ms:.1f}",
                 f"{dense_ms / sparse_ms:.2f}x"])
    header = (f"{environment()}; ComfyUI snapshot a125cd84 WanModel, Wan2.1-1.3B config, random weights, bf16, "
              f"latent 21x60x104 (32,760 tokens), batch 2 (both guidance branches), step {step} of 30; median of "
              f"{args.reps} (CUDA events, after warm-up); sparse calls {stats['sparse_calls']}, mean plan density "
              f"{stats['mean_density']:.3f}")
    table = markdown_table(["one denoising step", "density", "ms", "speedup"], rows)
    print(header)
    print(table)
    if args.smoke:
        return 0 if stats["sparse_calls"] > 0 else 1
    command = "COMFYUI_PATH=... python scripts/comfyui_step_time.py " + " ".join(sys.argv[1:])
    append_benchmarks(args.benchmarks_md, "ComfyUI node — Wan2.1-1.3B-shaped WanModel, one step", header, table,
                      command=command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
