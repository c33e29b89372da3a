"""``python -m sparsevid demo`` on small sizes: the CPU sections (small testbed), the CUDA sections (testbed-l
held-out cases, the kernel rows) run on the CPU with the kernel benchmark stubbed, and the verdict text."""

import json

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("torchmetrics")

from sparsevid.lab import cli, demo  # noqa: E402

SMALL = ["demo", "--device", "cpu", "--frames", "4", "--height", "64", "--width", "64", "--steps", "3", "--quiet"]


def test_cpu_demo_tables_pictures_and_no_speed_claim(tmp_path, capsys):
    assert cli.main([*SMALL, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for name in ("block_maps.png", "masks.png", "tiles.png", "clip_bigbuckbunny_s0.png", "results.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    res = json.loads((tmp_path / "results.json").read_text())
    table = {r["config"]: r for r in res["planner_table"]}
    assert set(table) == {f"{m}@{d:g}" for m in demo.TABLE_METHODS for d in (0.1, 0.25)} | {
        demo.TAIL_CLIP.name, demo.TUNED_CLIP.name}
    for r in table.values():
        assert 0 < r["kept_mass"] <= 1 + 1e-6 and 0 < r["oracle_mass"] <= 1 + 1e-6 and r["rel_err"] >= 0
    assert table["draft@0.25"]["kept_mass"] > table["random@0.25"]["kept_mass"]
    assert table["finegrained@0.25"]["oracle"] == "token" and table["draft@0.25"]["oracle"] == "block"
    clips = {r["config"]: r for r in res["clips"]["summary"]}
    assert set(clips) == {c.name for c in demo.CLIP_CONFIGS}
    assert clips[demo.TUNED_CLIP.name]["psnr"] > clips[demo.DEFAULT_CLIP.name]["psnr"]
    # the same plans with the skipped blocks as summaries: the same kept mass, a lower error
    tail, plain = table[demo.TAIL_CLIP.name], table["draft@0.1"]
    assert tail["kept_mass"] == pytest.approx(plain["kept_mass"]) and tail["rel_err"] < plain["rel_err"]
    assert "kept mass" in out and "oracle" in out and "block_size=32, budget='layer'" in out
    # speed: one line pointing to the GPU measurements, and no CPU time shown as a result
    assert "speed: measured on the GPU (BENCHMARKS.md" in out and "kernel_bench" not in res
    assert " ms" not in out and "s dense" not in out and "attn s" not in out


def test_gpu_sections_on_cpu_at_small_size(tmp_path, capsys, monkeypatch):
    """testbed-l on two of eval's held-out cases, then the kernel rows through bench.kernel's own parser
    and run (stubbed: it needs CUDA)."""
    from sparsevid.lab.bench import kernel

    calls = []
    monkeypatch.setattr(kernel, "run", lambda args: calls.append(args) or 0)
    argv = [*SMALL, "--testbed", "large", "--held-out", "2", "--frames", "2", "--densities", "0.25", "--kernel-bench",
            "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["testbed"] == "large" and res["kernel_bench"]["status"] == 0
    cases = {r["case"] for r in res["clips"]["videos"]}
    assert len(cases) == 2 and all(c.endswith("held-out") for c in cases)
    assert len(list(tmp_path.glob("clip_*held-out.png"))) == 2
    (args,) = calls
    assert args.shape == "wan1.3b-480p" and args.methods == ["draft"] and args.densities == [1.0, 0.25, 0.1]
    assert not args.record and args.out == str(tmp_path / "kernel")
    assert "speed: measured on the GPU" not in out and "bench kernel --shape wan1.3b-480p" in out


def _row(config, kept, err, achieved=0.1, oracle=0.3):
    method, density = config.split("@")
    return dict(config=config, method=method, density=float(density), options={}, achieved=achieved,
                kept_mass=kept, oracle="block", oracle_mass=oracle, rel_err=err)


@pytest.mark.parametrize("draft, says", [
    ((0.3, 0.2), "draft beats random"),
    ((0.3, 0.5), "does NOT beat random here. It keeps more of the mass, but these heads are diffuse"),
    ((0.1, 0.5), "does NOT beat random here: its pooled estimate misses"),
    ((0.2, 0.5), "compute the same blocks here"),
], ids=["wins", "diffuse", "misses", "no-choice"])
def test_verdict_says_whether_and_why_draft_beats_random(draft, says):
    rows = [_row("draft@0.1", *draft), _row("random@0.1", 0.2, 0.4)]
    (line,) = demo.verdict(rows, entropy=0.8)
    assert says in line and "density 0.1" in line
