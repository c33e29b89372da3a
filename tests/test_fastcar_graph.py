"""sparsevid.reuse.fastcar_graph: the static-cache decoder, FastCar decided on the device, compaction, CUDA graphs."""

import math

import pytest
import torch

pytest.importorskip("transformers")

from sparsevid.reuse import fastcar, fastcar_graph  # noqa: E402
from sparsevid.reuse.fastcar_graph import StaticDecoder  # noqa: E402

P = 8
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="CUDA graph capture needs a CUDA device (the CPU has no graphs)")


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


def test_replay_takes_the_mlp_output_one_frame_earlier():
    model, prompt = tiny_llama(layers=2), prompts(batch=2)
    engine = StaticDecoder(model, 2, 3 * P, P, [math.inf, -math.inf])  # layer 1 replays every eligible row
    engine.generate(prompt, 2 * P, graph=False)
    stats = engine.stats()
    assert stats["per_layer"][1]["rate"] == 1.0 and stats["per_layer"][0]["replayed"] == 0
    # the ring of layer 1 holds the prefill's MLP outputs still: every decoded row replayed them
    native = StaticDecoder(model, 2, 3 * P, P, None)
    native.prefill(prompt)
    torch.testing.assert_close(engine.ring[1], native.ring[1], rtol=0, atol=0)


def test_frame_parallel_compaction_equals_masked_path():
    model = tiny_llama(layers=2)
    tokens = prompts(batch=3, frames=3, seed=4)
    cal = StaticDecoder(model, 3, 3 * P, P, None)
    cal.tas_log = [[], []]
    cal.teacher_forced_frames(tokens)
    thresholds = [fastcar_graph._quantile_threshold(torch.cat(v), 0.5) for v in cal.tas_log]
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


def test_bench_decode_graph_and_frame_rows(tmp_path, monkeypatch):
    import json

    from sparsevid import cli
    from sparsevid.bench import decode

    monkeypatch.setitem(decode.SPEED_MODELS, "llama3.2-1b", dict(hidden_size=64, intermediate_size=128,
                                                                  num_hidden_layers=2, num_attention_heads=4,
                                                                  num_key_value_heads=2))
    md = tmp_path / "B.md"
    assert cli.main(["bench", "decode", "--rates", "0.3", "--batches", "1", "--frames", "1", "--calib", "1",
                     "--reps", "1", "--speed-model", "llama3.2-1b", "--no-test-model", "--no-eager", "--graph",
                     "--frame-batches", "1", "--out", str(tmp_path), "--record", "--benchmarks-md", str(md)]) == 0
    data = json.loads((tmp_path / "decode.json").read_text())
    assert [(r["target"], r["variant"].split()[0]) for r in data["graph_rows"]] == [
        ("none (graph baseline)", "-"), (0.3, "cond"), (0.3, "select")]
    assert data["graph_rows"][1]["achieved"] > 0 and data["graph_rows"][1]["bound"] > 1
    frames = data["frame_rows"]
    assert [r["target"] for r in frames] == [0.0, 0.3] and frames[1]["capacity"] < frames[1]["rows"]
    text = md.read_text()
    assert "FastCar under CUDA graphs" in text and "frame-parallel" in text


# ---------------------------------------------------------------------------------------- CUDA only
@needs_cuda
@pytest.mark.parametrize("capacity", [None, 2])
def test_cuda_graph_replay_equals_eager_decoder(capacity):
    model, prompt = tiny_llama(layers=3, device="cuda"), prompts(batch=4, device="cuda")
    thresholds = fastcar.calibrate(model, prompt, P, 0.4, 3 * P)
    eager = StaticDecoder(model, 4, 4 * P, P, thresholds, capacity=capacity)
    expected = eager.generate(prompt, 3 * P, graph=False)
    for conditional in (False, fastcar_graph.conditional_nodes_available()):
        engine = StaticDecoder(model, 4, 4 * P, P, thresholds, capacity=capacity, conditional=conditional)
        assert torch.equal(engine.generate(prompt, 3 * P, graph=True), expected)
        assert engine.stats()["replayed"] == eager.stats()["replayed"]
        assert torch.equal(engine.generate(prompt, 3 * P, graph=True), expected)  # replayed again, same tokens
    base = StaticDecoder(model, 4, 4 * P, decision="none")
    assert torch.equal(base.generate(prompt, 3 * P, graph=True), StaticDecoder(model, 4, 4 * P, decision="none")
                       .generate(prompt, 3 * P, graph=False))


@needs_cuda
def test_cuda_graph_frame_parallel_compaction():
    model, tokens = tiny_llama(layers=2, device="cuda"), prompts(batch=4, frames=3, seed=4, device="cuda")
    thresholds = [0.0, 0.0]
    masked = StaticDecoder(model, 4, 3 * P, P, thresholds).teacher_forced_frames(tokens)
    compact = StaticDecoder(model, 4, 3 * P, P, thresholds, capacity=16).teacher_forced_frames(tokens, graph=True)
    assert torch.equal(masked, compact)
