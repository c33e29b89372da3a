"""``python -m sparsevid eval`` in a reduced CPU setting (issue 6's CI check).

4 frames of 64x64 px = 4x16x16 tokens = 8 blocks of 128 (density 0.25 = 2 key blocks per query
block), 6 sampler steps (the first 2 dense: the default 20% warm-up), 2 labels x 1 seed.
"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("torchmetrics")

from sparsevid.lab import cli, eval as sv_eval  # noqa: E402

REDUCED = ["--seeds", "0", "--labels", "bikes", "carphone", "--steps", "6", "--frames", "4",
           "--height", "64", "--width", "64", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    code = cli.main(["eval", *REDUCED, "--methods", "dense", "draft", "random", "--densities", "0.25",
                     "--videos", "1", "--out", str(out)])
    assert code == 0
    return out, json.loads((out / "results.json").read_text())


def test_outputs_written(results):
    out, res = results
    for name in ("results.json", "videos.csv", "layers.csv", "summary.csv", "quality_vs_density.png",
                 "side_by_side_bikes_s0.mp4", "frames_bikes_s0.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert {r["config"] for r in res["summary"]} == {"dense", "draft@0.25", "random@0.25"}
    assert len(res["videos"]) == 2 * 3
    # per-layer error: every self-attention layer of the testbed, every config, every case
    layers = {r["layer"] for r in res["layers"]}
    assert layers == set(range(4))
    # per-layer error at every sparse step of every generation: steps 2-5 (2 dense warm-up steps), layers 1-3
    # (layer 0 dense), each cell a mean over the cases; the "dense" config runs its full plan through sparsevid
    cells = {(r["config"], r["step"], r["layer"]) for r in res["steps"]}
    configs = ("dense", "draft@0.25", "random@0.25")
    assert cells == {(c, s, la) for c in configs for s in range(2, 6) for la in (1, 2, 3)}
    assert all(r["cases"] == 2 and (r["rel_err"] < 1e-4 if r["config"] == "dense" else 1e-3 < r["rel_err"] < 2)
               for r in res["steps"])
    assert (out / "steps.csv").is_file() and (out / "step_errors.png").is_file() and (out / "table.txt").is_file()


def test_density_one_reproduces_dense(results):
    _, res = results
    for row in (r for r in res["videos"] if r["method"] == "dense"):
        assert row["achieved"] == pytest.approx(1.0)
        assert row["max_abs_diff"] < 1e-5  # float32 rounding of the reference backend only
        assert row["psnr"] == 100.0 and row["ssim"] == pytest.approx(1.0, abs=1e-5)
    for row in (r for r in res["layers"] if r["config"] == "dense"):
        assert row["rel_err"] < 1e-5 and row["kept_mass"] == pytest.approx(1.0, abs=1e-5)


def test_draft_beats_random_at_quarter_density(results):
    _, res = results
    summary = {r["config"]: r for r in res["summary"]}
    draft, random = summary["draft@0.25"], summary["random@0.25"]
    assert draft["achieved"] == pytest.approx(0.25, abs=0.05)
    assert random["achieved"] == pytest.approx(0.25, abs=0.05)
    assert draft["psnr"] > random["psnr"]
    assert draft["layer_err"] < random["layer_err"]
    kept = {c: sum(r["kept_mass"] for r in res["layers"] if r["config"] == c) for c in ("draft@0.25", "random@0.25")}
    assert kept["draft@0.25"] > kept["random@0.25"]  # the true mass each plan keeps (sparsevid.lab.stats.plan_mass)


def test_video_metrics():
    a = torch.rand(3, 3, 16, 16)
    same = sv_eval.video_metrics(a, a)
    assert same["psnr"] == 100.0 and same["max_abs_diff"] == 0
    noisy = sv_eval.video_metrics((a + 0.01 * torch.randn_like(a)).clamp(0, 1), a)
    assert 30 < noisy["psnr"] < 50 and noisy["ssim"] < 1


def _kept_outputs(tmp_path, capsys):
    video = torch.rand(3, 3, 8, 8)
    result = dict(videos=[dict(config="draft@0.25", psnr=20.0)], layers=[],
                  kept={"bikes seed 0": {"dense": video, "draft@0.25": video}})
    files = sv_eval.write_outputs(tmp_path, result, [], dict(pipeline="testbed", cases=1))
    return files, capsys.readouterr().out


def test_outputs_without_an_mp4_writer(tmp_path, monkeypatch, capsys):
    """Defect (issue 23): without PyAV, eval finished its work and then died in viz.write_video."""
    from sparsevid.lab import viz

    for module in ("av", "cv2"):  # neither importable (PyAV is declared, yet absent on some images)
        monkeypatch.setitem(sys.modules, module, None)
    assert viz.mp4_writer() is None
    files, out = _kept_outputs(tmp_path, capsys)
    assert {f.name for f in files} == {"results.json", "table.txt", "videos.csv", "frames_bikes_s0.png"}
    assert out.count("videos skipped") == 1 and "pip install av" in out
    with pytest.raises(ModuleNotFoundError, match="PyAV.*OpenCV"):
        viz.write_video(torch.zeros(2, 8, 8, 3, dtype=torch.uint8), tmp_path / "x.mp4")


def test_mp4_through_opencv_without_pyav(tmp_path, monkeypatch, capsys):
    """Without PyAV the side-by-side videos go through OpenCV (as sparsevid.lab.data decodes with it)."""
    import types

    from sparsevid.lab import viz

    written = []

    class VideoWriter:
        def __init__(self, path, fourcc, fps, size):
            self.path, self.size = path, size

        def write(self, frame):  # BGR uint8 (H, W, 3)
            assert frame.shape == (self.size[1], self.size[0], 3)
            written.append(frame)

        def release(self):
            Path(self.path).write_bytes(b"mp4")

    fake = types.SimpleNamespace(VideoWriter=VideoWriter, VideoWriter_fourcc=lambda *code: "".join(code))
    monkeypatch.setitem(sys.modules, "av", None)
    monkeypatch.setitem(sys.modules, "cv2", fake)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "av" else object())
    assert viz.mp4_writer() == "cv2"
    rgb = torch.zeros(2, 7, 9, 3, dtype=torch.uint8)
    rgb[..., 0] = 255  # red
    assert viz.write_video(rgb, tmp_path / "x.mp4").read_bytes() == b"mp4"
    assert written[0].shape == (8, 10, 3) and written[0][0, 0].tolist() == [0, 0, 255]  # even sizes, BGR
    files, _ = _kept_outputs(tmp_path, capsys)
    assert "side_by_side_bikes_s0.mp4" in {f.name for f in files}


def test_configs_and_dense_steps_parsing():
    configs = sv_eval.make_configs(["dense", "draft"], [0.1, 0.25], [None, 2, 0.5], [1])
    names = [c.name for c in configs]
    assert names.count("dense") == 1 and "dense (ds=2)" in names
    assert "draft@0.1 (ds=0.5)" in names and len(configs) == 3 + 6
    assert sv_eval._parse_dense_steps("auto") is None
    assert sv_eval._parse_dense_steps("3") == 3 and sv_eval._parse_dense_steps("0.2") == 0.2


def test_labelled_configs_are_told_apart():
    """Configurations that differ only in planner options (the demo's default and tuned settings) get
    their own label, so their videos and summary rows are not merged under one generated name."""
    plain = sv_eval.Config("draft", 0.1)
    tuned = sv_eval.Config("draft", 0.1, options=dict(block_size=32), label="tuned")
    assert plain.name == "draft@0.1" and tuned.name == "tuned" and plain != tuned


def test_reuse_configs_and_spec_errors(capsys):
    configs = sv_eval.make_configs(["draft", "none"], [0.25], reuse=["replay:rate=0.3", "replay:rate=0.1+fbc:threshold=0.1"])
    names = [c.name for c in configs]
    assert names == ["draft@0.25", "draft@0.25 + replay:rate=0.3", "draft@0.25 + replay:rate=0.1+fbc:threshold=0.1",
                     "none + replay:rate=0.3", "none + replay:rate=0.1+fbc:threshold=0.1"]
    with pytest.raises(ValueError, match="teacache:threshold=0.1"):
        sv_eval.make_configs(["draft"], [0.25], reuse=["teacache:threshold=0.1"])
    with pytest.raises(SystemExit):  # one line on stderr, exit status 2, before the pipeline loads
        cli.main(["eval", *REDUCED, "--reuse", "replay:rate=2"])
    assert "replay:rate=2" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"replay:rate=0.1\+replay:rate=0.2"):
        sv_eval.make_configs(["draft"], [0.25], reuse=["replay:rate=0.1+replay:rate=0.2"])
    with pytest.raises(ValueError, match="--methods none"):
        sv_eval.make_configs(["none"], [0.25])


def test_reuse_fidelity(tmp_path):
    args = cli.build_parser().parse_args(["eval", *REDUCED, "--labels", "bikes"])
    target = sv_eval.TARGETS["testbed"]
    pipe = target.load(args, "cpu")
    configs = sv_eval.make_configs(["draft", "none"], [0.25], reuse=["replay:threshold=1e9", "replay:rate=0.3"])
    result = sv_eval.evaluate(target, pipe, args, configs, keep_videos=1, progress=False)
    videos, rows = result["kept"]["bikes seed 0"], {r["config"]: r for r in result["videos"]}
    # a threshold no token reaches replays nothing: exactly the video without reuse
    assert rows["draft@0.25 + replay:threshold=1e9"]["replay_rate"] == 0
    assert torch.equal(videos["draft@0.25 + replay:threshold=1e9"], videos["draft@0.25"])
    assert rows["none + replay:threshold=1e9"]["psnr"] == 100.0 and rows["none + replay:threshold=1e9"]["achieved"] is None
    replay = rows["draft@0.25 + replay:rate=0.3"]
    assert 0 < replay["replay_rate"] < 0.3 and replay["reuse"] == "replay:rate=0.3"
    assert not torch.equal(videos["draft@0.25 + replay:rate=0.3"], videos["draft@0.25"])
    assert rows["draft@0.25"]["replay_rate"] is None and rows["none + replay:rate=0.3"]["psnr"] < 100
    # per-layer error: the attention plans only, once per attention config
    assert {r["config"] for r in result["layers"]} == {"draft@0.25"}
    summary = {r["config"]: r for r in sv_eval.summarize(result["videos"], result["layers"], configs)}
    assert summary["draft@0.25 + replay:rate=0.3"]["layer_err"] == summary["draft@0.25"]["layer_err"] is not None
    assert summary["none + replay:rate=0.3"]["layer_err"] is None
    assert "replayed" in sv_eval.format_table(list(summary.values()))
    settings = dict(pipeline="testbed", cases=1)
    sv_eval.write_outputs(tmp_path, result, list(summary.values()), settings)
    assert (tmp_path / "quality_vs_density.png").is_file()
    assert "replay_rate" in (tmp_path / "videos.csv").read_text().splitlines()[0]


def test_planner_options_reach_every_sparse_config(results, tmp_path):
    _, plain = results
    code = cli.main(["eval", *REDUCED, "--methods", "draft", "--densities", "0.25", "--option", "block_size=32",
                     "--videos", "0", "--no-layer-error", "--out", str(tmp_path)])
    assert code == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert [c["options"] for c in res["settings"]["configs"]] == [{"block_size": 32}]
    default = {r["case"]: r["psnr"] for r in plain["videos"] if r["config"] == "draft@0.25"}
    assert all(r["psnr"] != default[r["case"]] for r in res["videos"])  # 32-token blocks: another plan
    with pytest.raises(SystemExit):  # argparse names the bad --option
        cli.main(["eval", "--option", "block_size"])


def test_mass_quant_configs_and_motion_metric():
    from sparsevid.lab.eval import Config, make_configs, video_metrics

    configs = make_configs(["draft", "window", "dense"], [0.1], masses=[0.9], quants=["int8"])
    names = [c.name for c in configs]
    assert "draft mass=0.9" in names and "window mass=0.9" not in names  # window takes no mass budget
    assert "draft@0.1 int8" in names and "draft mass=0.9 int8" in names
    dense_q = next(c for c in configs if c.method == "dense" and c.quant == "int8")
    assert dense_q.dense_layers == 0 and dense_q.dense_steps == 0  # quantized dense: every layer and step
    with pytest.raises(ValueError, match="quant"):
        Config("draft", 0.1, quant="int4").check()
    # tdiff_err: a video with its reference's motion reversed is all error; a constant offset moves nothing
    ref = torch.rand(5, 3, 8, 8)
    assert video_metrics(ref.clamp(0, 0.9) + 0.1, ref.clamp(0, 0.9))["tdiff_err"] < 1e-6
    assert video_metrics(ref.flip(0), ref)["tdiff_err"] > 0.5


def test_held_out_cases(tmp_path):
    from sparsevid.lab.testbed import Motion

    with pytest.raises(SystemExit):  # the small testbed has no motion condition: a clear CLI error
        cli.main(["eval", *REDUCED, "--held-out", "2", "--methods", "draft", "--out", str(tmp_path)])
    out = tmp_path / "large"
    code = cli.main(["eval", "--testbed", "large", "--held-out", "2", "--seeds", "0", "--steps", "2", "--frames", "2",
                     "--height", "32", "--width", "32", "--device", "cpu", "--quiet", "--methods", "draft",
                     "--densities", "0.5", "--masses", "0.9", "--videos", "0", "--out", str(out)])
    assert code == 0
    rows = json.loads((out / "results.json").read_text())["videos"]
    assert {r["config"] for r in rows} == {"draft@0.5", "draft mass=0.9"}
    assert all("reverse=True" in r["motion"] and "speed=2" in r["motion"] for r in rows)  # held-out motions
    assert all(r["tdiff_err"] is not None for r in rows)
    g = torch.Generator().manual_seed(1000)
    assert Motion.random(g, 4, held_out=True).held_out


def test_held_out_case_builder_seeds_and_motions():
    import argparse

    from sparsevid.lab.eval import TestbedTarget
    from sparsevid.lab.testbed import Motion

    pipe = argparse.Namespace(labels=("bikes", "carphone", "coastguard"))
    args = argparse.Namespace(labels=None, seeds=None, held_out=5)
    cases = TestbedTarget().cases(pipe, args)
    assert [c["seed"] for c in cases] == [0, 1, 2, 3, 4]  # seed i: no repeats
    assert [c["label"] for c in cases] == ["bikes", "carphone", "coastguard", "bikes", "carphone"]
    assert all(isinstance(c["motion"], Motion) and c["motion"].held_out for c in cases)
    assert cases[3]["motion"] == Motion.random(torch.Generator().manual_seed(1003), 3, held_out=True)
    assert len({c["motion"] for c in cases}) == 5
    args.seeds = [7, 9]  # --seeds cycled
    assert [c["seed"] for c in TestbedTarget().cases(pipe, args)] == [7, 9, 7, 9, 7]
    args.held_out = 0  # labels x seeds as before; default seeds 0..3
    assert len(TestbedTarget().cases(pipe, args)) == 6
    args.seeds = None
    assert [c["seed"] for c in TestbedTarget().cases(pipe, args)][::3] == [0, 1, 2, 3]


def test_held_out_motion_reaches_the_pipeline():
    from sparsevid.lab.eval import TestbedTarget
    from sparsevid.lab.testbed import Motion

    seen = {}

    def pipe(**kwargs):
        seen.update(kwargs)
        return torch.zeros(2, 3, 8, 8)

    import argparse

    args = argparse.Namespace(steps=2, frames=2, height=8, width=8)
    motion = Motion(reverse=True, speed=2, cx=0.8)
    TestbedTarget().generate(pipe, dict(label="bikes", seed=3, motion=motion), args, False)
    assert seen["motion"] is motion and seen["seed"] == 3
    seen.clear()
    TestbedTarget().generate(pipe, dict(label="bikes", seed=3), args, False)
    assert "motion" not in seen


def test_quant_configs_skip_token_plans_and_run_on_cpu(capsys):
    from sparsevid.lab.eval import make_configs

    names = [c.name for c in make_configs(["draft", "finegrained", "dense"], [0.1], masses=[0.9], quants=["int8"],
                                          device="cpu")]
    assert "finegrained@0.1" in names and "finegrained@0.1 int8" not in names  # token plans: no 8-bit backend
    assert {"draft@0.1 int8", "draft mass=0.9 int8", "dense int8 (ds=0, dl=0)"} <= set(names)
    assert "finegrained" in capsys.readouterr().out


def test_small_testbed_masses_tdiff_quant_dense(tmp_path, capsys):
    """4 frames 32x32 on the small testbed: mass configs land at a measured density, tdiff_err everywhere,
    quantized dense (reference-int8 on CPU) close to dense, --noise-floor skipped with a note on CPU."""
    out = tmp_path / "small"
    code = cli.main(["eval", "--seeds", "0", "--labels", "bikes", "--steps", "3", "--frames", "4", "--height", "32",
                     "--width", "32", "--device", "cpu", "--quiet", "--methods", "dense", "draft", "--densities", "0.5",
                     "--masses", "0.9", "--quant", "int8", "--noise-floor", "--videos", "0", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "--noise-floor skipped" in printed and "tdiff" in printed and "attn ms" in printed
    res = json.loads((out / "results.json").read_text())
    summary = {r["config"]: r for r in res["summary"]}
    assert set(summary) == {"dense", "draft@0.5", "draft mass=0.9", "dense int8 (ds=0, dl=0)", "draft@0.5 int8",
                            "draft mass=0.9 int8"}
    assert 0 < summary["draft mass=0.9"]["achieved"] <= 1 and summary["draft mass=0.9"]["mass"] == 0.9
    assert all(r["tdiff_err"] is not None for r in res["summary"])
    assert all(r["attn_ms"] is None for r in res["summary"])  # kernel times on CUDA only
    assert summary["dense int8 (ds=0, dl=0)"]["psnr"] > 25
    assert res["settings"]["frames"] == 4 and res["settings"]["noise_floor"] is False
    assert (out / "summary.csv").read_text().count("mass=0.9") >= 2


def test_native_size_by_default():
    import argparse

    from sparsevid.lab.eval import TestbedTarget

    args = argparse.Namespace(testbed="small", held_out=0, weights=None, frames=None, height=48, width=None)
    pipe = TestbedTarget().load(args, "cpu")
    assert (args.frames, args.height, args.width) == (pipe.spec.sample["frames"], 48, pipe.spec.sample["width"])


def test_summary_pairs_each_tail_config_with_its_no_tail_twin():
    """``vs_no_tail`` is the mean over cases of each case's PSNR difference to the same plan without a tail,
    and the per-step error columns summarise the per-call rows (mean, worst cell)."""
    from sparsevid.lab.eval import Config, summarize

    plain, tailed = Config("draft", 0.1), Config("draft", 0.1, tail="pooled-var")
    labelled = Config("draft", 0.1, tail="pooled-var", label="mine")
    videos = [dict(case=c, config=cfg.name, psnr=p, ssim=0.5, achieved=0.1, seconds=1.0, dense_seconds=1.0)
              for c, cfg, p in (("a", plain, 20.0), ("b", plain, 24.0), ("a", tailed, 23.0), ("b", tailed, 25.0),
                                ("a", labelled, 30.0))]
    steps = [dict(case="a", config=tailed.name, step=s, layer=1, rel_err=e) for s, e in ((4, 0.1), (5, 0.3))]
    rows = {r["config"]: r for r in summarize(videos, [], [plain, tailed, labelled], steps)}
    assert rows[tailed.name]["vs_no_tail"] == pytest.approx(2.0)  # (+3 + +1) / 2
    assert rows[plain.name]["vs_no_tail"] is None
    assert rows["mine"]["vs_no_tail"] == pytest.approx(10.0)  # paired with draft@0.1, not with itself
    assert rows[tailed.name]["step_err"] == pytest.approx(0.2) and rows[tailed.name]["step_err_max"] == pytest.approx(0.3)


def test_replan_every_configs_reach_sparsevid_apply(capsys):
    """``--replan-every`` is an axis of every sparse config (dense replans every step: one config), named, passed
    to sparsevid.apply, and a config's per-layer error is its twin's that replans every step (a fresh plan)."""
    from sparsevid.lab.eval import Config, make_configs, summarize

    configs = make_configs(["dense", "draft"], [0.25], masses=[0.9], replan_every=[1, 4])
    assert [c.name for c in configs] == ["dense", "draft@0.25", "draft@0.25 (replan=4)", "draft mass=0.9",
                                         "draft mass=0.9 (replan=4)"]
    reused = configs[2]
    assert reused.settings.replan_every == 4 and reused.attention == Config("draft", 0.25)
    assert Config("draft", 0.25, dense_steps=2, replan_every=2).name == "draft@0.25 (ds=2, replan=2)"
    videos = [dict(case="a", config=reused.name, psnr=20.0, ssim=0.5, achieved=0.25, seconds=1.0, dense_seconds=1.0)]
    layers = [dict(case="a", config="draft@0.25", layer=1, rel_err=0.3, attn_ms=None, dense_ms=None)]
    (row,) = summarize(videos, layers, [reused])
    assert row["replan_every"] == 4 and row["layer_err"] == pytest.approx(0.3)
    with pytest.raises(SystemExit) as exit_info:  # refused before the pipeline loads
        cli.main(["eval", *REDUCED, "--replan-every", "0"])
    assert exit_info.value.code == 2 and "--replan-every" in capsys.readouterr().err
