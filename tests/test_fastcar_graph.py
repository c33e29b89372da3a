"""sparsevid.decoder.fastcar_graph: the static-cache decoder, FastCar decided on the device, compaction, CUDA graphs."""

import math
import os

import pytest
import torch

pytest.importorskip("transformers")

from sparsevid.decoder import fastcar, fastcar_graph  # noqa: E402
from sparsevid.decoder._llama import quantile_threshold  # noqa: E402
from sparsevid.decoder.fastcar_graph import StaticDecoder  # noqa: E402

P = 8
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="CUDA graph capture needs a CUDA device (the CPU has no graphs)")
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# the CPU-path tests of the Triton MLP (host and device paths with the same kernels); on a GPU the CUDA tests below
# compare graph and eager with the same kernels
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="the Triton MLP on CPU tensors needs TRITON_INTERPRET=1")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_llama(layers=2, heads=4, kv_heads=2, seed=0, device="cpu"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=128,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).eval().to(device)


def prompts(batch=3, frames=1, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 32, (batch, frames * P), generator=g).to(device)


def decode(model, prompt, n, thresholds, **kw):
    engine = StaticDecoder(model, prompt.shape[0], prompt.shape[1] + n, P, thresholds, **kw)
    engine.log = []
    tokens = engine.generate(prompt, n, graph=False)
    return tokens, [(i, r) for i, r in engine.log], engine.stats()


def test_no_replay_decoder_equals_transformers_generate():
    model, prompt = tiny_llama(), prompts()
    native = fastcar.generate(model, prompt, 3 * P)
    for thresholds, decision in ((None, "none"), (None, "device"), (1e9, "device")):
        engine = StaticDecoder(model, 3, 4 * P, P, thresholds, decision=decision)
        assert torch.equal(engine.generate(prompt, 3 * P, graph=False), native)
    teacher = torch.randint(0, 32, (3, 2 * P), generator=torch.Generator().manual_seed(5))
    engine = StaticDecoder(model, 3, 3 * P, decision="none")
    assert torch.equal(engine.generate(prompt, 2 * P, teacher=teacher, graph=False),
                       fastcar.generate(model, prompt, 2 * P, teacher=teacher))


def test_device_decision_equals_host_reference_and_hooks():
    """Same replayed rows (per step and layer) and same tokens: host reference, device select, device
    compaction at full and at short capacity (overflow), and the transformers-hook path."""
    model, prompt = tiny_llama(layers=3), prompts(batch=4)
    thresholds = fastcar.calibrate(model, prompt, P, 0.4, 3 * P)
    ref_tokens, ref_log, ref_stats = decode(model, prompt, 3 * P, thresholds, decision="host")
    assert 0 < ref_stats["replay_rate"] < 1
    for capacity in (None, 4, 2, 1):
        tokens, log, stats = decode(model, prompt, 3 * P, thresholds, decision="device", capacity=capacity)
        assert torch.equal(tokens, ref_tokens), capacity
        assert len(log) == len(ref_log) and all(i == j and torch.equal(a, b) for (i, a), (j, b) in zip(log, ref_log))
        assert [l["replayed"] for l in stats["per_layer"]] == [l["replayed"] for l in ref_stats["per_layer"]]
        assert stats["rows"] == ref_stats["rows"]
    handle = fastcar.apply(model, P, thresholds)
    hooked = fastcar.generate(model, prompt, 3 * P)
    hook_stats = handle.stats()
    handle.remove()
    assert torch.equal(hooked, ref_tokens)
    assert [l["replayed"] for l in hook_stats["per_layer"]] == [l["replayed"] for l in ref_stats["per_layer"]]
    assert hook_stats["rows"] == ref_stats["rows"]


@needs_interpreter
def test_triton_mlp_decoder_equals_host_reference():
    """The predicated Triton MLP (interpreter) decides and computes like the host reference with the same
    kernels: decode at batch 4 (rows in place, one tile) and a frame-parallel forward of 3 x 8 rows
    (kept rows sorted first, tiles past the device-side count skipped). Against cuBLAS only the last
    bits of the MLP outputs differ: same tokens and decisions here.

    Bit for bit only where both paths run the same tile shape. Decode: the host's kept rows and the
    device's 4 rows each fill one 16-row tile. Frames: the host runs its at most 16 kept rows in 16-row
    tiles, the device all 24 sorted rows in 32-row tiles; the interpreter's ``tl.dot`` is
    ``numpy.matmul`` (OpenBLAS), and OpenBLAS's FMA kernels (Haswell, Zen: picked at run time from the
    CPU) round a row differently in a 16-row and a 32-row product, its AVX kernels (Sandybridge) do not,
    so the ring is compared at float32 rounding there (the CPU decided the bitwise outcome)."""
    model, prompt = tiny_llama(layers=3), prompts(batch=4)
    thresholds = fastcar.calibrate(model, prompt, P, 0.4, 3 * P)
    ref_tokens, ref_log, ref_stats = decode(model, prompt, 3 * P, thresholds, decision="host", mlp="triton")
    assert 0 < ref_stats["replay_rate"] < 1
    tokens, log, stats = decode(model, prompt, 3 * P, thresholds, decision="device", mlp="triton")
    assert torch.equal(tokens, ref_tokens) and stats["replayed"] == ref_stats["replayed"]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(log, ref_log))
    cublas_tokens, cublas_log, _ = decode(model, prompt, 3 * P, thresholds, decision="host")
    assert torch.equal(cublas_tokens, ref_tokens)
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(cublas_log, ref_log))

    model = tiny_llama(layers=2)
    frames = prompts(batch=3, frames=3, seed=4)
    cal = StaticDecoder(model, 3, 3 * P, P, None)
    cal.tas_log = [[], []]
    cal.teacher_forced_frames(frames)
    thresholds = [quantile_threshold(torch.cat(v), 0.5) for v in cal.tas_log]
    results = []
    for decision in ("host", "device"):
        engine = StaticDecoder(model, 3, 3 * P, P, thresholds, decision=decision, mlp="triton")
        engine.log = []
        results.append((engine.teacher_forced_frames(frames), engine.ring.clone(), engine.log, engine.stats()))
    (ref_preds, ref_ring, ref_log, ref_stats), (preds, ring, log, stats) = results
    assert 0 < ref_stats["replay_rate"] < 1
    assert torch.equal(preds, ref_preds) and stats["replayed"] == ref_stats["replayed"]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(log, ref_log))
    # a replayed row computed, or a kept row skipped, is off by the outputs' own size, not by 1e-5 of it
    torch.testing.assert_close(ring, ref_ring, rtol=1e-5, atol=1e-5 * ref_ring.abs().max().item())


def test_capture_warm_up_counts_no_replays():
    """The H200 mismatch (graph path 119 replayed rows, eager 111, same tokens), reproduced on the CPU:
    capture() warms up with two decode steps on a fresh decoder, whose zero key cache gives TAS = 0, so a
    layer whose threshold is <= 0 replays every row there, and the device counter used to keep them
    (2 steps x batch 4 x 1 such layer = the 8 extra rows). The decisions themselves are the same code
    with and without a graph; the warm-up now restores the counter."""
    model, prompt = tiny_llama(layers=3), prompts(batch=4)
    thresholds = [math.inf, -0.01, math.inf]  # layer 1 replays TAS >= -0.01, the warm-up's TAS = 0 too
    eager = StaticDecoder(model, 4, 4 * P, P, thresholds)
    expected = eager.generate(prompt, 3 * P, graph=False)
    with torch.no_grad():
        for warm_up, extra in ((lambda e: [e._step() for _ in range(2)], 2 * 4), (lambda e: e._warm_up(e._step), 0)):
            engine = StaticDecoder(model, 4, 4 * P, P, thresholds)
            engine.pos.fill_(P)  # what capture() sets before warming up
            warm_up(engine)
            assert engine.stats()["replayed"] == extra
            assert torch.equal(engine.generate(prompt, 3 * P, graph=False), expected)
            assert engine.stats()["replayed"] == eager.stats()["replayed"] + extra


@pytest.mark.parametrize("mlp", ["cublas", pytest.param("triton", marks=needs_interpreter)])
def test_replay_takes_the_mlp_output_one_frame_earlier(mlp):
    model, prompt = tiny_llama(layers=2), prompts(batch=2)
    engine = StaticDecoder(model, 2, 3 * P, P, [math.inf, -math.inf], mlp=mlp)  # layer 1 replays every eligible row
    engine.generate(prompt, 2 * P, graph=False)
    stats = engine.stats()
    assert stats["per_layer"][1]["rate"] == 1.0 and stats["per_layer"][0]["replayed"] == 0
    # the ring of layer 1 holds the prefill's MLP outputs still: every decoded row replayed them
    # (with the predicated kernels: no replayed row was ever written)
    native = StaticDecoder(model, 2, 3 * P, P, None, mlp=mlp)
    native.prefill(prompt)
    torch.testing.assert_close(engine.ring[1], native.ring[1], rtol=0, atol=0)


def test_frame_parallel_compaction_equals_masked_path():
    model = tiny_llama(layers=2)
    tokens = prompts(batch=3, frames=3, seed=4)
    cal = StaticDecoder(model, 3, 3 * P, P, None)
    cal.tas_log = [[], []]
    cal.teacher_forced_frames(tokens)
    thresholds = [quantile_threshold(torch.cat(v), 0.5) for v in cal.tas_log]
    results = {}
    for decision, capacity in (("host", None), ("device", None), ("device", 24), ("device", 8)):
        engine = StaticDecoder(model, 3, 3 * P, P, thresholds, decision=decision, capacity=capacity)
        engine.log = []
        preds = engine.teacher_forced_frames(tokens)
        results[(decision, capacity)] = (preds, engine.ring.clone(), engine.log, engine.stats())
    ref_preds, ref_ring, ref_log, ref_stats = results[("host", None)]
    assert 0 < ref_stats["replay_rate"] < 1 and ref_preds.shape == (3, 2 * P)
    for key, (preds, ring, log, stats) in results.items():
        assert torch.equal(preds, ref_preds), key
        assert torch.equal(ring, ref_ring), key  # the MLP outputs of the last frame, bit for bit
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(log, ref_log)), key
        assert stats["replayed"] == ref_stats["replayed"], key


def test_calibrate_for_agreement_and_frontier(tmp_path):
    model, prompt = tiny_llama(layers=2), prompts(batch=3)
    result = fastcar_graph.calibrate_agreement(model, prompt, P, 0.9, 2 * P, step=0.25)
    assert result["frontier"][0] == dict(replay=0.0, agreement=1.0, rates=[0.0, 0.0])
    assert result["agreement"] >= 0.9 and len(result["thresholds"]) == 2
    # the thresholds reproduce the calibration point
    engine = StaticDecoder(model, 3, 3 * P, P, result["thresholds"])
    reference = StaticDecoder(model, 3, 3 * P, decision="none").generate(prompt, 2 * P, graph=False)
    tokens = engine.generate(prompt, 2 * P, graph=False)
    assert float((tokens == reference).float().mean()) == pytest.approx(result["agreement"])
    assert engine.stats()["replay_rate"] == pytest.approx(result["replay"])
    assert len(fastcar.calibrate(model, prompt, P, None, 2 * P, target_agreement=0.9)) == 2
    with pytest.raises(ValueError, match="target_agreement"):
        fastcar.calibrate(model, prompt, P, 0.3, 2 * P, target_agreement=0.9)
    path = tmp_path / "frontier.png"
    fastcar_graph.plot_frontier(str(path), {"search": [(p["replay"], p["agreement"]) for p in result["frontier"]]}, 0.9)
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_bad_arguments_and_shares():
    model = tiny_llama()
    with pytest.raises(ValueError, match="decision"):
        StaticDecoder(model, 1, 16, P, decision="maybe")
    with pytest.raises(ValueError, match="tokens_per_frame"):
        StaticDecoder(model, 1, 16, None, decision="device")
    with pytest.raises(ValueError, match="capacity"):
        StaticDecoder(model, 1, 16, P, capacity=2, decision="host")
    with pytest.raises(ValueError, match="mlp"):
        StaticDecoder(model, 1, 16, P, mlp="cutlass")
    with pytest.raises(ValueError, match="capacity=None with mlp='triton'"):
        StaticDecoder(model, 1, 16, P, mlp="triton", capacity=2)
    engine = StaticDecoder(model, 1, 16, P)
    with pytest.raises(ValueError, match="max_len"):
        engine.generate(prompts(batch=1), 64, graph=False)
    if not CUDA:
        with pytest.raises(RuntimeError, match="CUDA"):
            engine.capture()
    with pytest.raises(ValueError, match="graph=False"):
        engine.log = []
        engine.generate(prompts(batch=1), 4, graph=True)
    m = fastcar_graph.mlp_weight_share(model)
    f = fastcar_graph.mlp_flop_share(model, 64, 128)
    assert 0 < m < 1 and 0 < f < 1


def test_faster_mlp_keeps_the_least_time():
    assert fastcar_graph.faster_mlp({"cublas": 0.30, "triton": 0.21}) == "triton"
    assert fastcar_graph.faster_mlp({"cublas": 0.20, "triton": 0.21}) == "cublas"
    assert fastcar_graph.faster_mlp({"triton": 0.25, "cublas": 0.25}) == "cublas"  # a tie: no Triton kernels
    assert fastcar_graph.faster_mlp({"triton": 0.25}) == "triton"
    for bad in ({}, {"cublas": math.nan, "triton": 0.2}, {"cublas": -1.0}, {"cutlass": 0.1, "triton": 0.2}):
        with pytest.raises(ValueError, match="timings"):
            fastcar_graph.faster_mlp(bad)


@pytest.mark.parametrize("mlp", ["auto", "cublas", pytest.param("triton", marks=needs_interpreter)])
def test_mlp_choice_without_cuda_is_the_one_asked_or_cublas(mlp):
    """On the CPU "auto" (the default) is cuBLAS, untimed: the same tokens and decisions as mlp="cublas";
    explicit kernels stay what was asked. capacity with "auto" is the cuBLAS compaction."""
    model, prompt = tiny_llama(layers=2), prompts(batch=2)
    thresholds = [0.0, 0.0]
    engine = StaticDecoder(model, 2, 3 * P, P, thresholds, mlp=mlp)
    tokens = engine.generate(prompt, 2 * P, graph=False)
    chosen = "cublas" if mlp == "auto" else mlp
    assert engine.mlp == chosen and engine.stats()["mlp"] == dict(requested=mlp, chosen=chosen, rate=None, ms=None)
    explicit = StaticDecoder(model, 2, 3 * P, P, thresholds, mlp=chosen)
    assert torch.equal(explicit.generate(prompt, 2 * P, graph=False), tokens)
    assert explicit.stats()["replayed"] == engine.stats()["replayed"] > 0
    assert StaticDecoder(model, 2, 3 * P, P, thresholds).mlp_request == "auto"
    if mlp == "auto":
        assert StaticDecoder(model, 2, 3 * P, P, thresholds, mlp=mlp, capacity=4).mlp == "cublas"


def test_measured_replay_rate_leaves_the_counters():
    """What mlp="auto" times the kernels at: the replay rate of an uncaptured decode, the counters as before."""
    model, prompt = tiny_llama(layers=3), prompts(batch=4)
    thresholds = fastcar.calibrate(model, prompt, P, 0.4, 3 * P)
    eager = StaticDecoder(model, 4, 4 * P, P, thresholds)
    eager.generate(prompt, 3 * P, graph=False)
    engine = StaticDecoder(model, 4, 4 * P, P, thresholds, track=False)
    rate = engine._measure_replay(lambda: engine._decode(prompt, 3 * P, graph=False))
    assert rate == pytest.approx(eager.stats()["replay_rate"]) and 0 < rate < 1
    assert engine.stats()["rows"] == 0 and engine.stats()["replayed"] == 0 and not engine.track


def test_no_import_circle_between_the_two_decoders():
    """fastcar (hooks) may use fastcar_graph (calibration for agreement); fastcar_graph never imports fastcar."""
    import ast
    import inspect

    def imported(module):
        tree = ast.parse(inspect.getsource(module))
        return {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 1}

    assert "fastcar_graph" in imported(fastcar) and "fastcar" not in imported(fastcar_graph)
    assert fastcar.decoder_layers is fastcar_graph.decoder_layers  # one anatomy, in decoder/_llama.py


def test_bench_decode_graph_and_frame_rows(tmp_path, monkeypatch):
    import json

    from sparsevid.lab import cli
    from sparsevid.decoder import bench as decode
    from sparsevid.decoder import triton_mlp

    if INTERPRET:  # the kernels have their own tests (and the decoder with them); interpreted, this would take minutes
        monkeypatch.setattr(triton_mlp, "predicated_mlp", triton_mlp.predicated_mlp_reference)
    monkeypatch.setitem(decode.SPEED_MODELS, "llama3.2-1b", dict(hidden_size=64, intermediate_size=128,
                                                                  num_hidden_layers=2, num_attention_heads=4,
                                                                  num_key_value_heads=2))
    md = tmp_path / "B.md"
    assert cli.main(["bench", "decode", "--rates", "0.3", "--batches", "1", "--frames", "1", "--calib", "1",
                     "--reps", "1", "--speed-model", "llama3.2-1b", "--no-test-model", "--no-eager", "--graph",
                     "--frame-batches", "1", "--out", str(tmp_path), "--record", "--benchmarks-md", str(md)]) == 0
    data = json.loads((tmp_path / "decode.json").read_text())
    # cond only where torch has IF nodes; the two baselines, then rates and the breakdown x variants, auto last
    cond = fastcar_graph.conditional_nodes_available()
    variants = ["cond"] * cond + ["select", "predicated"]
    targets = (0.3, "r=0: decision only", "r=1: all replayed")
    rows = {(r["target"], r["variant"]): r for r in data["graph_rows"]}
    autos = {r["target"]: r for r in data["graph_rows"] if r["variant"].startswith("auto")}
    assert [(r["target"], r["variant"]) for r in data["graph_rows"]] == [
        ("none (graph baseline)", "- (cuBLAS MLP)"), ("none (graph baseline)", "- (Triton MLP)"),
        *[(t, v) for t in targets for v in (*variants, autos[t]["variant"])]]
    # auto's label names the path its recorded choice runs: on CUDA the faster of the two it timed (either may win
    # on a given device), elsewhere cuBLAS, untimed; its replays are those of the explicit variant of that path
    labels = {"cublas": {"auto: select", *["auto: cond"] * cond}, "triton": {"auto: predicated"}}
    for t, auto in autos.items():
        choice = auto["mlp_choice"]
        assert auto["variant"] in labels[choice["chosen"]]
        assert auto["mlp"] == {"cublas": "cuBLAS", "triton": "Triton"}[choice["chosen"]]
        if CUDA:
            assert choice["requested"] == "auto" and set(choice["ms"]) == {"cublas", "triton"}
            assert choice["chosen"] == fastcar_graph.faster_mlp(choice["ms"])
        else:
            assert choice == dict(requested="auto", chosen="cublas", rate=None, ms=None)
        explicit = "predicated" if choice["chosen"] == "triton" else "select"
        assert auto["achieved"] == rows[(t, explicit)]["achieved"]
    assert rows[(0.3, "predicated")]["achieved"] > 0 and rows[(0.3, "predicated")]["bound"] > 1
    assert rows[("r=0: decision only", "select")]["achieved"] == 0
    assert rows[("r=1: all replayed", "predicated")]["achieved"] == 1
    frames = data["frame_rows"]
    assert [(r["target"], r["mlp"]) for r in frames] == [(0.0, "cuBLAS"), (0.0, "Triton"), (0.3, "cuBLAS"), (0.3, "Triton")]
    assert frames[2]["capacity"] < frames[2]["rows"] and frames[3]["capacity"] == "device count"
    text = md.read_text()
    assert "FastCar under CUDA graphs" in text and "frame-parallel" in text and "predicated" in text
    assert all(f"| {t} | {auto['variant']} |" in text for t, auto in autos.items())  # the table says what json says


# ---------------------------------------------------------------------------------------- CUDA only
@needs_cuda
@pytest.mark.parametrize("mlp,capacity", [("cublas", None), ("cublas", 2), ("triton", None)])
@pytest.mark.parametrize("batch", [1, 4])
def test_cuda_graph_replay_equals_eager_decoder(mlp, capacity, batch):
    """Graph replay equals the eager decoder: tokens, per-layer replay counts (every decode step's
    decisions summed), and the same again on a second replay of the captured graph."""
    model, prompt = tiny_llama(layers=3, device="cuda"), prompts(batch=batch, device="cuda")
    thresholds = fastcar.calibrate(model, prompt, P, 0.4, 3 * P)
    eager = StaticDecoder(model, batch, 4 * P, P, thresholds, mlp=mlp, capacity=capacity)
    expected = eager.generate(prompt, 3 * P, graph=False)
    per_layer = [l["replayed"] for l in eager.stats()["per_layer"]]
    assert 0 < eager.stats()["replay_rate"] < 1
    for conditional in (False, fastcar_graph.conditional_nodes_available()):
        engine = StaticDecoder(model, batch, 4 * P, P, thresholds, mlp=mlp, capacity=capacity, conditional=conditional)
        assert torch.equal(engine.generate(prompt, 3 * P, graph=True), expected)
        assert [l["replayed"] for l in engine.stats()["per_layer"]] == per_layer
        engine.reset_stats()
        assert torch.equal(engine.generate(prompt, 3 * P, graph=True), expected)  # replayed again, same tokens
        assert [l["replayed"] for l in engine.stats()["per_layer"]] == per_layer
    base = StaticDecoder(model, batch, 4 * P, decision="none", mlp=mlp)
    assert torch.equal(base.generate(prompt, 3 * P, graph=True), StaticDecoder(model, batch, 4 * P, decision="none", mlp=mlp)
                       .generate(prompt, 3 * P, graph=False))


@needs_cuda
@pytest.mark.parametrize("mlp,capacity", [("cublas", 16), ("triton", None)])
def test_cuda_graph_frame_parallel_compaction(mlp, capacity):
    model, tokens = tiny_llama(layers=2, device="cuda"), prompts(batch=4, frames=3, seed=4, device="cuda")
    thresholds = [0.0, 0.0]
    masked = StaticDecoder(model, 4, 3 * P, P, thresholds, mlp=mlp)
    expected = masked.teacher_forced_frames(tokens)
    compact = StaticDecoder(model, 4, 3 * P, P, thresholds, mlp=mlp, capacity=capacity)
    assert torch.equal(compact.teacher_forced_frames(tokens, graph=True), expected)
    assert compact.stats()["replayed"] == masked.stats()["replayed"] > 0


@needs_cuda
@pytest.mark.parametrize("frames", [False, True])
def test_cuda_auto_mlp_times_both_and_keeps_the_faster(frames):
    """mlp="auto" on CUDA: both kernels timed at the capture, the faster kept, at the replay rate of the
    uncaptured decode (frame); the graph then gives what an explicit decoder with the chosen kernels gives."""
    model = tiny_llama(layers=3, device="cuda")
    if frames:
        tokens = prompts(batch=4, frames=3, seed=4, device="cuda")
        thresholds = [0.0, 0.0, 0.0]
        run = lambda e, graph: e.teacher_forced_frames(tokens, graph=graph)  # noqa: E731
    else:
        prompt = prompts(batch=4, device="cuda")
        thresholds = fastcar.calibrate(model, prompt, P, 0.4, 3 * P)
        run = lambda e, graph: e.generate(prompt, 3 * P, graph=graph)  # noqa: E731
    auto = StaticDecoder(model, 4, 4 * P, P, thresholds)
    got = run(auto, True)
    choice = auto.stats()["mlp"]
    assert choice["requested"] == "auto" and set(choice["ms"]) == {"cublas", "triton"}
    assert all(ms > 0 for ms in choice["ms"].values()) and choice["chosen"] == fastcar_graph.faster_mlp(choice["ms"])
    explicit = StaticDecoder(model, 4, 4 * P, P, thresholds, mlp=choice["chosen"])
    assert torch.equal(got, run(explicit, False))
    assert auto.stats()["replayed"] == explicit.stats()["replayed"] > 0  # the timing's replays not counted
    if not frames:  # the replay rate of the decode uncaptured with cuBLAS (a frame: of the first frame captured)
        cublas = StaticDecoder(model, 4, 4 * P, P, thresholds, mlp="cublas")
        run(cublas, False)
        assert choice["rate"] == pytest.approx(cublas.stats()["replay_rate"])


@needs_cuda
def test_cuda_predicated_mlp_skips_in_the_graph():
    """At batch 1 with every eligible row replayed, the captured step's MLP outputs are the ring's: the
    kernels returned before computing (a wrong skip would write computed rows over them)."""
    model, prompt = tiny_llama(layers=2, device="cuda"), prompts(batch=1, device="cuda")
    engine = StaticDecoder(model, 1, 3 * P, P, [-math.inf, -math.inf], mlp="triton")
    engine.generate(prompt, 2 * P, graph=True)
    assert engine.stats()["replay_rate"] == 1.0
    native = StaticDecoder(model, 1, 3 * P, P, None, mlp="triton")
    native.prefill(prompt)
    assert torch.equal(engine.ring, native.ring)
