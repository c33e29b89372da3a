"""sparsevid.reuse: FastCar MLP replay (AR decode), token-level FFN replay and step caches (video DiTs)."""

import math
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("diffusers")

import sparsevid as sv  # noqa: E402
from sparsevid.decoder import fastcar  # noqa: E402
from sparsevid.reuse import TokenReplay  # noqa: E402
from sparsevid.reuse.dit import apply_token_replay, replay_sources  # noqa: E402
from tiny_models import tiny_wan, tiny_wan_pipeline, wan_inputs  # noqa: E402

P = 8  # tokens per frame of the tiny AR model


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Token-by-token decode of tiny models: many tiny ops, which intra-op threads only slow down
    (on a shared 2-core machine by 50x through spin-waiting)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_llama(layers=2, heads=4, kv_heads=2, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=128,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).eval()


def prompts(batch=3, frames=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 32, (batch, frames * P), generator=g)


def count_mlp_rows(model):
    """Rows each layer's MLP really computes (gate_proj input rows), per call."""
    calls = []
    handles = [layer.mlp.gate_proj.register_forward_pre_hook(lambda m, a, i=i: calls.append((i, a[0].shape[:-1].numel())))
               for i, layer in enumerate(model.model.layers)]
    return calls, handles


# ---------------------------------------------------------------------------------------- FastCar
def test_fastcar_no_replay_is_exact_and_remove_restores():
    model, prompt = tiny_llama(), prompts()
    native = fastcar.generate(model, prompt, 3 * P)
    handle = fastcar.apply(model, P)  # thresholds None: never replay
    assert torch.equal(fastcar.generate(model, prompt, 3 * P), native)
    handle.set_thresholds(math.inf)
    assert torch.equal(fastcar.generate(model, prompt, 3 * P), native)
    handle.set_thresholds(1e9)  # finite but never reached: TAS computed, every row computed, same bits
    assert torch.equal(fastcar.generate(model, prompt, 3 * P), native)
    assert handle.stats()["rows"] > 0 and handle.stats()["replayed"] == 0
    handle.remove()
    assert all("forward" not in layer.mlp.__dict__ for layer in model.model.layers)
    assert not hasattr(model, "_sparsevid_fastcar")
    assert torch.equal(fastcar.generate(model, prompt, 3 * P), native)


def test_fastcar_skips_mlp_rows_and_replays_previous_frame():
    model, prompt = tiny_llama(layers=2), prompts(batch=4)
    handle = fastcar.apply(model, P, [math.inf, -math.inf])  # layer 1 replays every row with a previous frame
    calls, hooks = count_mlp_rows(model)
    captured = []  # (position, layer-1 MLP output)
    out_hook = model.model.layers[1].mlp.register_forward_hook(lambda m, a, o: captured.append(o.detach().clone()))
    tokens = fastcar.generate(model, prompt, 2 * P)
    for h in hooks + [out_hook]:
        h.remove()
    decode = [(layer, rows) for layer, rows in calls[2:]]  # after the prefill call of each layer
    assert [r for layer, r in decode if layer == 0] == [4] * (2 * P - 1)
    assert [r for layer, r in decode if layer == 1] == []  # the MLP never ran on a decode row
    stats = handle.stats()
    assert stats["per_layer"][1]["rate"] == 1.0 and stats["per_layer"][0]["replayed"] == 0
    # decode step outputs are exactly the MLP outputs one frame earlier (prefill holds positions 0..P-1)
    prefill, steps = captured[0], captured[1:]
    for t, out in enumerate(steps):  # position P + t
        source = prefill[:, t] if t < P else steps[t - P][:, 0]
        assert torch.equal(out[:, 0], source)
    handle.remove()
    assert tokens.shape == (4, 2 * P)


def test_fastcar_partial_replay_gathers_rows_per_batch_element():
    model, prompt = tiny_llama(layers=2), prompts(batch=6, frames=2)
    thresholds = fastcar.calibrate(model, prompt, P, 0.5, 2 * P)
    handle = fastcar.apply(model, P, thresholds)
    calls, hooks = count_mlp_rows(model)
    fastcar.generate(model, prompt, 2 * P)
    for h in hooks:
        h.remove()
    stats = handle.stats()
    handle.remove()
    decode_rows = sum(r for _, r in calls) - 2 * 6 * 2 * P  # minus the two prefill calls
    assert decode_rows == stats["rows"] - stats["replayed"] < stats["rows"]
    assert any(0 < r < 6 for _, r in calls)  # some steps ran the MLP on a strict subset of the batch


@pytest.mark.parametrize("target", [0.25, 0.6])
def test_calibration_hits_target_rate(target):
    model, prompt = tiny_llama(layers=3), prompts(batch=8, seed=3)
    thresholds = fastcar.calibrate(model, prompt, P, target, 3 * P)
    assert len(thresholds) == 3 and all(math.isfinite(t) for t in thresholds)
    handle = fastcar.apply(model, P, thresholds)
    fastcar.generate(model, prompt, 3 * P)
    for layer in handle.stats()["per_layer"]:
        assert abs(layer["rate"] - target) < 0.1, layer
    handle.remove()
    per_layer = fastcar.calibrate(model, prompt, P, [0.0, 0.5, 1.0], 3 * P)
    assert per_layer[0] == math.inf and per_layer[2] == -math.inf and math.isfinite(per_layer[1])


def test_tas_matches_attention_logits():
    """TAS = mean over heads of q(p).k(p-P)/sqrt(d) with RoPE, as the attention computes it (GQA)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

    model, prompt = tiny_llama(layers=1, heads=4, kv_heads=2), prompts(batch=2)
    handle = fastcar.apply(model, P)
    handle.record_tas(True)
    tokens = fastcar.generate(model, prompt, P + 3)
    tas = handle.tas()[0].view(-1, 2)  # (decode steps, B): the tokens fed at positions P .. 2P+1
    handle.remove()
    seq = torch.cat([prompt, tokens], 1)[:, : 2 * P + 3]
    attn = model.model.layers[0].self_attn
    got = {}
    hooks = [attn.q_proj.register_forward_hook(lambda m, a, o: got.__setitem__("q", o)),
             attn.k_proj.register_forward_hook(lambda m, a, o: got.__setitem__("k", o))]
    with torch.no_grad():
        model(input_ids=seq)
        B, L = seq.shape
        q = got["q"].view(B, L, -1, 8).transpose(1, 2)
        k = got["k"].view(B, L, -1, 8).transpose(1, 2)
        cos, sin = model.model.rotary_emb(q, torch.arange(L)[None])
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k = repeat_kv(k, 2)
    for h in hooks:
        h.remove()
    positions = torch.arange(P, 2 * P + 2)
    expected = (q[:, :, positions] * k[:, :, positions - P]).sum(-1).mean(1) / math.sqrt(8)  # (B, steps)
    torch.testing.assert_close(tas, expected.T, rtol=1e-4, atol=1e-5)


def test_fastcar_bad_arguments():
    model = tiny_llama()
    with pytest.raises(ValueError, match="tokens_per_frame"):
        fastcar.apply(model, 0)
    with pytest.raises(ValueError, match="thresholds"):
        fastcar.apply(model, P, [0.1])
    with pytest.raises(TypeError, match="thresholds"):
        fastcar.apply(model, P, "high")
    with pytest.raises(ValueError, match="layers"):
        fastcar.apply(model, P, layers=[5])
    with pytest.raises(TypeError, match="model"):
        fastcar.apply(torch.nn.Linear(2, 2), P)
    with pytest.raises(ValueError, match="target_rate"):
        fastcar.calibrate(model, prompts(), P, 1.5, P)
    with pytest.raises(ValueError, match="new_tokens"):
        fastcar.generate(model, prompts(), 0)
    with pytest.raises(TypeError, match="prompt"):
        fastcar.generate(model, prompts().float(), 2)
    handle = fastcar.apply(model, P)
    with pytest.raises(ValueError, match="without FastCar"):
        fastcar.apply(model, P)
    handle.remove()


@pytest.mark.skipif(not os.path.exists(fastcar.__file__.replace("fastcar.py", "weights/ar_video.safetensors")),
                    reason="AR video weights not trained yet")
def test_committed_ar_video_model_decodes_real_clips():
    from sparsevid.decoder.train import TOKENS_PER_FRAME, clip_sequences, load_model

    model, codebook = load_model()
    assert sum(p.numel() * p.element_size() for p in model.parameters()) < 15e6
    seqs = clip_sequences(codebook, "test")[:2]
    with torch.no_grad():
        logits = model(input_ids=seqs).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), seqs[:, 1:].reshape(-1))
    assert loss < math.log(codebook.centroids.shape[0]) - 1.0  # far better than uniform
    tokens = fastcar.generate(model, seqs[:, :TOKENS_PER_FRAME], 8)
    assert tokens.shape == (2, 8)


# ---------------------------------------------------------------------------------------- DiT token replay
def run(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


def test_replay_sources_chain():
    compute = torch.tensor([[[True, True], [False, True], [False, False], [True, False]]])  # (1, F=4, S=2)
    assert replay_sources(compute).tolist() == [[[0, 0], [0, 1], [0, 1], [3, 1]]]


@pytest.mark.parametrize("config", [TokenReplay(rate=0.5), TokenReplay(threshold=0.0, layers=(0, 1))])
def test_token_replay_skips_ffn_rows_and_remove_restores(config):
    model, inputs = tiny_wan(num_layers=2), wan_inputs()  # 3 frames x 5 x 7 tokens, batch 2
    native = run(model, inputs)
    rows, io = [], []
    hooks = [b.ffn.net[0].register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[:-1].numel()))
             for b in model.blocks]
    hooks += [model.blocks[1].ffn.register_forward_hook(lambda m, a, o: io.append((a[0], o)))]
    handle = apply_token_replay(model, config)
    out = run(model, inputs)
    stats = handle.stats()
    handle.remove()
    for h in hooks:
        h.remove()
    L = 3 * 5 * 7
    assert torch.isfinite(out).all() and not torch.equal(out, native)
    assert rows[0] == (2 * L if config.layers is None else rows[0]) and min(rows) < 2 * L
    if config.rate is not None:
        assert rows[1] == 2 * (L - round(0.5 * 2 * 35))  # static count per batch element
    assert sum(rows) == sum(2 * L for _ in rows) - stats["replayed"]
    # every block-1 FFN output row equals the native FFN output of itself or of an earlier frame's token
    x, y = io[0]
    with torch.no_grad():
        ref = model.blocks[1].ffn.net[2](model.blocks[1].ffn.net[1](model.blocks[1].ffn.net[0](x)))
    y, ref = y.view(2, 3, 35, -1), ref.view(2, 3, 35, -1)
    same = (y.unsqueeze(2) - ref.unsqueeze(1)).abs().amax(-1) < 1e-5  # (B, F_out, F_src, S)
    assert same.any(2).all()
    assert torch.equal(run(model, inputs), native)  # bit-identical after remove()


def test_token_replay_rate_zero_is_exact():
    model, inputs = tiny_wan(num_layers=2), wan_inputs()
    native = run(model, inputs)
    handle = apply_token_replay(model, TokenReplay(rate=0.0))
    assert torch.equal(run(model, inputs), native)
    handle.remove()


def test_apply_with_reuse_composes_sparse_attention_token_replay_and_first_block_cache():
    from diffusers.hooks import FirstBlockCacheConfig

    pipe = tiny_wan_pipeline()
    kwargs = dict(prompt="a bunny runs in the grass", negative_prompt="blue sky", height=48, width=80, num_frames=9,
                  num_inference_steps=4, guidance_scale=5.0, max_sequence_length=16, output_type="pt")
    native = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).frames
    last_block = []
    # the cache hooks replace a skipped block's forward; its cross-attention runs only when it computes
    counter = pipe.transformer.blocks[-1].attn2.register_forward_pre_hook(lambda m, a: last_block.append(1))
    handle = sv.apply(pipe, method="draft", density=0.3, dense_layers=0, dense_steps=1, tile=(2, 4), block_size=16,
                      reuse=[TokenReplay(rate=0.3), FirstBlockCacheConfig(threshold=10.0)])
    assert pipe.transformer.is_cache_enabled
    frames = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).frames
    stats = handle.stats()
    handle.remove()
    counter.remove()
    assert torch.isfinite(frames).all() and frames.shape == native.shape
    assert stats["plans"] > 0
    assert stats["reuse"][0]["token_replay"]["replay_rate"] > 0
    assert stats["reuse"][0]["step_cache"] == "FirstBlockCacheConfig"
    assert len(last_block) < 4 * 2  # FirstBlockCache skipped the later blocks on some steps
    assert not pipe.transformer.is_cache_enabled
    assert torch.equal(pipe(**kwargs, generator=torch.Generator().manual_seed(0)).frames, native)

    # reuse only (method=None), removed through sv.remove
    sv.apply(pipe, method=None, reuse=TokenReplay(rate=0.3))
    assert not torch.equal(pipe(**kwargs, generator=torch.Generator().manual_seed(0)).frames, native)
    sv.remove(pipe)
    assert torch.equal(pipe(**kwargs, generator=torch.Generator().manual_seed(0)).frames, native)


def test_reuse_bad_arguments():
    from diffusers.hooks import FirstBlockCacheConfig

    model = tiny_wan()
    with pytest.raises(TypeError, match="reuse"):
        sv.apply(model, reuse="fbc")
    with pytest.raises(ValueError, match="TokenReplay"):
        sv.apply(model, reuse=[TokenReplay(rate=0.1), TokenReplay(rate=0.2)])
    with pytest.raises(ValueError, match="rate / threshold"):
        TokenReplay()
    with pytest.raises(ValueError, match="rate"):
        TokenReplay(rate=1.5)
    with pytest.raises(ValueError, match="threshold"):
        TokenReplay(threshold=float("nan"))
    with pytest.raises(ValueError, match="layers"):
        apply_token_replay(model, TokenReplay(rate=0.1, layers=(7,)))
    with pytest.raises(TypeError, match="config"):
        apply_token_replay(model, 0.3)
    assert not getattr(model, "_diffusers_hook", None) or not model._diffusers_hook.hooks  # nothing left behind
    model.enable_cache(FirstBlockCacheConfig())
    with pytest.raises(ValueError, match="cache enabled"):
        sv.apply(model, reuse=FirstBlockCacheConfig())
    model.disable_cache()



def test_step_cache_that_hooks_nothing_is_refused():
    from diffusers.hooks import TaylorSeerCacheConfig

    model = tiny_wan()
    with pytest.raises(ValueError, match="matched none"):  # default identifiers miss Wan's attn1/attn2
        sv.apply(model, method=None, reuse=TaylorSeerCacheConfig())
    assert not model.is_cache_enabled
    handle = sv.apply(model, method=None, reuse=TaylorSeerCacheConfig(use_lite_mode=True))
    assert model.is_cache_enabled
    handle.remove()
    assert not model.is_cache_enabled


def test_bench_e2e_reuse_specs():
    from diffusers.hooks import FirstBlockCacheConfig, TaylorSeerCacheConfig

    from sparsevid.lab.bench.e2e import parse_reuse

    replay, fbc, taylor = parse_reuse(["replay:rate=0.3,layers=[1, 2]", "fbc:threshold=0.1", "taylorseer:cache_interval=4"])
    assert replay == TokenReplay(rate=0.3, layers=(1, 2))
    assert isinstance(fbc, FirstBlockCacheConfig) and fbc.threshold == 0.1
    assert isinstance(taylor, TaylorSeerCacheConfig) and taylor.cache_interval == 4
    with pytest.raises(ValueError, match="--reuse"):
        parse_reuse(["teacache:threshold=0.1"])


def test_bench_decode_reports_test_model_and_speed_model_rows(tmp_path, monkeypatch):
    import json

    from sparsevid.lab import cli
    from sparsevid.decoder import bench as decode

    # a small stand-in for the 1B shape keeps the CPU run short; the code path is the same
    monkeypatch.setitem(decode.SPEED_MODELS, "llama3.2-1b", dict(hidden_size=64, intermediate_size=128,
                                                                  num_hidden_layers=2, num_attention_heads=4,
                                                                  num_key_value_heads=2))
    assert cli.main(["bench", "decode", "--rates", "0.3", "--batches", "1", "--frames", "1", "--calib", "2",
                     "--reps", "1", "--speed-model", "llama3.2-1b", "--no-record", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "decode.json").read_text())["rows"]
    assert [(r["model"], r["target"]) for r in rows] == [
        ("test model", 0.0), ("test model", 0.3), ("llama3.2-1b (random weights)", 0.0), ("llama3.2-1b (random weights)", 0.3)]
    assert rows[1]["achieved"] > 0 and 0 < rows[1]["agreement"] <= 1  # fidelity on the trained test model
    assert rows[3]["achieved"] > 0 and "agreement" not in rows[3]  # speed only on random weights
