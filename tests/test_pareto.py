"""``python -m sparsevid bench pareto``: the frontier against an independent oracle, the settings grid, the
command end to end on the small testbed (tiny Wan shape on the CPU) and its refusals before any work."""

import csv
import hashlib
import json
import random
import re
import shlex
import subprocess

import pytest
import torch

from sparsevid.lab import cli
from sparsevid.lab.bench import pareto


def front_oracle(points):
    """A sweep, not pairwise domination: by decreasing x, a point is on the frontier when its y is the best of
    its x and above every y of a strictly larger x (equal points are both kept)."""
    best_by_x = {}
    for x, y in points:
        best_by_x[x] = max(best_by_x.get(x, -float("inf")), y)
    above, keep = -float("inf"), set()
    for x in sorted(best_by_x, reverse=True):
        if best_by_x[x] > above:
            keep |= {i for i, p in enumerate(points) if p == (x, best_by_x[x])}
            above = best_by_x[x]
    return keep


@pytest.mark.parametrize("points, expected", [
    ([], []),
    ([(1.5, 20.0)], [0]),
    ([(1.0, 30.0), (2.0, 20.0), (1.5, 19.0), (3.0, 10.0), (0.5, 25.0)], [0, 1, 3]),  # 2 and 4 dominated
    ([(2.0, 20.0), (2.0, 20.0), (1.0, 10.0)], [0, 1]),  # equal points both on it, the slower worse one not
    ([(2.0, 20.0), (2.0, 25.0)], [1]),  # same speed: the better quality only
    ([(2.0, 20.0), (3.0, 20.0)], [1]),  # same quality: the faster only
    ([(1.0, float("inf")), (0.9, 50.0), (1.0, 40.0), (1.8, 28.0)], [0, 3]),  # native anchor beats <= 1x
])
def test_pareto_front_cases(points, expected):
    assert pareto.pareto_front(points) == expected
    assert set(expected) == front_oracle(points)


def test_pareto_front_matches_the_oracle_on_random_points():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 12)
        points = [(round(rng.uniform(0.5, 3.0), 1), round(rng.uniform(15, 35), 0)) for _ in range(n)]  # ties often
        front = pareto.pareto_front(points)
        assert set(front) == front_oracle(points), points
        assert [points[i] for i in front] == sorted(points[i] for i in front)


def _row(name, speedup, psnr):
    return dict(setting=name, speed={"s": dict(speedup=speedup)}, quality={"small": dict(psnr=psnr)})


def test_frontiers_per_shape_and_testbed_with_native_as_anchor():
    rows = [dict(setting=pareto._NATIVE, speed={"s": dict(speedup=1.0)}, quality={}),
            _row("slow", 0.8, 60.0), _row("even", 1.0, 50.0), _row("a", 1.5, 30.0), _row("b", 2.0, 25.0),
            _row("c", 1.8, 24.0), _row("unmeasured", None, 40.0)]
    fronts = pareto.frontiers(rows, ["s"], ["small"])
    assert fronts == {"s x small testbed": [pareto._NATIVE, "a", "b"]}
    assert [r["setting"] for r in rows if r["frontier"]] == [pareto._NATIVE, "a", "b"]
    assert pareto.frontiers(rows[:1], ["s"], ["small"]) == {}  # native alone: no frontier


def test_settings_grid_scoped_options_and_left_out_combinations(capsys):
    settings = pareto.make_settings(
        ["draft", "random"], [0.25], [0.9], [None],
        [("draft", "budget", "head"), ("draft", "budget", "row"), ("random", "seed", 3)])
    names = [s.name for s in settings]
    assert names == ["draft@0.25 [budget='head']", "draft mass=0.9 [budget='head']", "draft@0.25 [budget='row']",
                     "draft mass=0.9 [budget='row']", "random@0.25 [seed=3]"]
    assert settings[-1].options == {"seed": 3} and settings[2].options == {"budget": "row"}
    assert "random mass=0.9 [seed=3] left out" in capsys.readouterr().out  # random takes no mass
    # a tail is for block plans: finegrained runs without it, its tailed setting is left out
    settings = pareto.make_settings(["draft", "finegrained"], [0.25], [], [None, "pooled-var"], [])
    assert [s.name for s in settings] == ["draft@0.25", "draft@0.25 tail=pooled-var", "finegrained@0.25"]
    assert "finegrained@0.25 tail=pooled-var left out" in capsys.readouterr().out
    # a method's own tail axis (the option key tail, none: off) instead of --tail
    settings = pareto.make_settings(["draft", "finegrained"], [0.25], [], [None],
                                    [("draft", "tail", "pooled-var-32"), ("draft", "tail", None)])
    assert [s.name for s in settings] == ["draft@0.25 tail=pooled-var-32", "draft@0.25", "finegrained@0.25"]
    assert pareto.scoped_option("draft:tail=none") == ("draft", "tail", None)
    assert pareto.scoped_option("draft:tail=pooled-var-32") == ("draft", "tail", "pooled-var-32")
    assert pareto.scoped_option("q_clusters=512") == (None, "q_clusters", 512)
    assert pareto.scoped_option("clustered:budget='a:b'") == ("clustered", "budget", "a:b")


@pytest.mark.parametrize("methods, masses, tails, options, match", [
    (["finegrained"], [], ["pooled-var"], [], "BlockPlan"),  # the tail value works in no combination
    (["draft"], [], [None], [("draft", "budget", "bogus")], "budget"),  # one option value works nowhere
    (["draft"], [], [None], [(None, "seed", 1)], "seed"),  # draft takes no seed
    (["draft"], [], [None], [("random", "seed", 1)], "random"),  # scoped to a method not in the grid
    (["draft"], [], [None], [("draft", "tail", "bogus")], "tail"),  # a method's own tail value
    (["window"], [0.9], [None], [], "mass|density|radius"),
])
def test_settings_grid_refuses_a_value_no_combination_takes(methods, masses, tails, options, match):
    with pytest.raises((ValueError, TypeError), match=match):
        pareto.make_settings(methods, [0.25] if methods != ["window"] else [], masses, tails, options)


def test_settings_grid_replan_every_is_a_setting_not_a_planner_option():
    settings = pareto.make_settings(["draft", "clustered"], [0.25], [], [None],
                                    [("clustered", "replan_every", 1), ("clustered", "replan_every", 2),
                                     ("clustered", "q_clusters", 8)])
    assert [s.name for s in settings] == ["draft@0.25", "clustered@0.25 [q_clusters=8]",
                                          "clustered@0.25 (replan=2) [q_clusters=8]"]
    assert [s.replan_every for s in settings] == [1, 1, 2] and settings[2].options == {"q_clusters": 8}
    assert settings[2].settings.replan_every == 2  # what sparsevid.apply gets


@pytest.mark.parametrize("value", [0, -1, "x", 1.5])
def test_settings_grid_refuses_a_bad_replan_every(value):
    with pytest.raises(ValueError, match="replan_every"):
        pareto.make_settings(["draft"], [0.25], [], [None], [(None, "replan_every", value)])


def _speed_with_recorded_plans(monkeypatch, settings, reps):
    """``measure_speed`` at the tiny shape with every planner call recorded (whether it was given centroids,
    i.e. warm-started) and each timed call's plans counted; a timed call returns 30 ms (+1 per call) where its
    forwards planned, 10 ms (+1 per call) where they did not, so the rows' arithmetic is checked exactly."""
    from sparsevid.integrations import core
    from sparsevid.lab.bench import e2e

    planned, timed = [], []
    make_plan, time_ms = core.make_plan, pareto.time_ms

    def recording_plan(*args, **kwargs):
        planned.append("centroids" in kwargs)
        return make_plan(*args, **kwargs)

    def recording_time(fn, **kwargs):
        before = len(planned)
        time_ms(fn, **kwargs)
        made = len(planned) - before
        timed.append(made)
        return (30.0 if made else 10.0) + len(timed)

    monkeypatch.setattr(core, "make_plan", recording_plan)
    monkeypatch.setattr(pareto, "time_ms", recording_time)  # the native forwards
    monkeypatch.setattr(e2e, "time_ms", recording_time)  # the settings' (e2e.time_sparse_forward)
    _, rows = pareto.measure_speed("tiny", settings, reps, "cpu", False)
    return rows, planned, timed


def test_speed_of_a_replan_every_setting_is_amortised_over_its_steps(monkeypatch):
    """A setting replanning every 2 steps: ``reps`` planning forwards (warm-started from the last plan's
    centroids, as a generation's) alternate with reusing forwards that plan nothing; forward_ms is
    (plan + reuse) / 2 of their medians. A setting replanning every step plans at every timed forward, warm."""
    pytest.importorskip("diffusers")
    settings = pareto.make_settings(["clustered"], [0.5], [], [None],
                                    [(None, "replan_every", 1), (None, "replan_every", 2), (None, "q_clusters", 4),
                                     (None, "k_clusters", 4)])
    rows, planned, timed = _speed_with_recorded_plans(monkeypatch, settings, reps=2)
    every_step, reused = (rows[s.name] for s in settings)
    assert settings[1].name == "clustered@0.5 (replan=2) [q_clusters=4, k_clusters=4]"
    # native (no plan), replan=1 (one call of 2 forwards, each plans), replan=2: plan, reuse, plan, reuse
    assert [made > 0 for made in timed] == [False, True, True, False, True, False]
    # a cold plan in each warm-up forward (one sparse layer), every later plan from the last plan's centroids
    assert planned == [False, True, True, False, True, True]
    assert "plan_forward_ms" not in every_step and every_step["forward_ms"] == 32.0
    assert reused["plan_forward_ms"] == 34.0 and reused["reuse_forward_ms"] == 15.0  # medians of 33, 35 and 14, 16
    assert reused["forward_ms"] == pytest.approx((34.0 + 15.0) / 2) and reused["replan_every"] == 2
    assert reused["speedup"] == pytest.approx(every_step["speedup"] * 32.0 / 24.5)
    assert reused["sparse_calls"] > 0 and reused["finite"]


def test_a_reusing_forward_that_plans_is_an_error(monkeypatch):
    pytest.importorskip("diffusers")
    from sparsevid.integrations import core

    monkeypatch.setattr(core.SparseSession, "_cached_plan", lambda self, key: None)  # plans never reused
    settings = pareto.make_settings(["draft"], [0.5], [], [None], [(None, "replan_every", 3)])
    with pytest.raises(RuntimeError, match="reusing forward of draft@0.5 \\(replan=3\\) at step 9"):
        pareto.measure_speed("tiny", settings, 1, "cpu", False)


def test_amortised_rows_in_the_outputs(tmp_path):
    pytest.importorskip("diffusers")
    assert cli.main(["bench", "pareto", "--shapes", "tiny", "--testbeds", "--reps", "1", "--quiet", "--methods",
                     "draft", "--densities", "0.5", "--option", "replan_every=1", "--option", "replan_every=2",
                     "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "pareto.json").read_text())
    rows = {r["setting"]: r for r in res["rows"]}
    assert rows["draft@0.5 (replan=2)"]["replan_every"] == 2 and rows["draft@0.5"]["replan_every"] == 1
    assert "amortised over N steps" in res["header"] and "N = 2" in res["header"]
    with open(tmp_path / "pareto.csv") as f:
        flat = {r["setting"]: r for r in csv.DictReader(f)}
    reused = flat["draft@0.5 (replan=2)"]
    plan, reuse = float(reused["tiny plan_forward_ms"]), float(reused["tiny reuse_forward_ms"])
    assert float(reused["tiny forward_ms"]) == pytest.approx((plan + reuse) / 2)
    assert flat["draft@0.5"]["tiny plan_forward_ms"] == ""


def test_weights_version(tmp_path):
    loose = tmp_path / "w.bin"
    loose.write_bytes(b"weights")
    assert pareto.weights_version(loose) == "sha256 " + hashlib.sha256(b"weights").hexdigest()
    from sparsevid.lab.testbed.model import SPECS

    path = SPECS["small"].weights
    try:
        expected = subprocess.run(["git", "log", "-1", "--format=%H", "--", str(path)], cwd=path.parent,
                                  capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        expected = ""
    if expected:
        assert pareto.weights_version(path).split(" ")[:2] == ["git", expected]
    else:  # no git, no repository, or one without the file in its history (a copy of the tree): the file's digest
        assert pareto.weights_version(path) == "sha256 " + hashlib.sha256(path.read_bytes()).hexdigest()


SMALL = ["--testbeds", "small", "--cases", "2", "--steps", "2", "--frames", "4", "--height", "32", "--width", "32",
         "--quiet"]


def test_command_end_to_end_writes_every_output(tmp_path):
    pytest.importorskip("diffusers")
    pytest.importorskip("torchmetrics")
    out, md = tmp_path / "out", tmp_path / "B.md"
    code = cli.main(["bench", "pareto", "--shapes", "tiny", "--reps", "1", *SMALL, "--methods", "draft", "random",
                     "--densities", "0.5", "--tail", "none", "pooled-var", "--option", "random:seed=1",
                     "--option", "random:tail=none",
                     "--out", str(out), "--record", "--benchmarks-md", str(md)])
    assert code == 0
    res = json.loads((out / "pareto.json").read_text())
    names = [r["setting"] for r in res["rows"]]
    assert names == [pareto._NATIVE, "draft@0.5", "draft@0.5 tail=pooled-var", "random@0.5 [seed=1]"]
    for row in res["rows"][1:]:
        assert row["speed"]["tiny"]["forward_ms"] > 0 and row["speed"]["tiny"]["finite"]
        assert row["speed"]["tiny"]["sparse_calls"] > 0  # the setting's forward really ran sparse
        q = row["quality"]["small"]
        assert q["videos"] == 2 and 0 < q["psnr"] <= 100 and 0 < q["ssim"] <= 1 and q["tdiff_err"] >= 0
    assert res["testbed_runs"]["small"]["names"] == ["bigbuckbunny seed 0", "bikes seed 0"]
    assert re.match(r"(git [0-9a-f]{40}|sha256 [0-9a-f]{64})", res["testbed_runs"]["small"]["weights"])
    assert res["frontiers"]["tiny x small testbed"][0] == pareto._NATIVE
    assert res["device"] and "tiny" in res["native"]
    with open(out / "pareto.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["setting"] for r in rows] == names and "small psnr" in rows[0] and "tiny speedup" in rows[0]
    assert (out / "pareto.png").stat().st_size > 10_000
    text = (out / "pareto.txt").read_text()
    assert "Frontier" in text and "weights" in text
    recorded = md.read_text()
    assert "## bench pareto — tiny, small testbed" in recorded and "Command: `python -m sparsevid" in recorded
    assert "draft@0.5 tail=pooled-var" in recorded


def test_join_splits_a_grid_over_runs(tmp_path, capsys):
    """Speed in one run, quality in another joined to it: one table, one frontier; a part measured twice or
    a file bench pareto did not write is refused before any work."""
    pytest.importorskip("diffusers")
    grid = ["--methods", "draft", "--densities", "0.5", "--tail", "none", "pooled-var"]
    first, second = tmp_path / "speed", tmp_path / "joined"
    assert cli.main(["bench", "pareto", "--shapes", "tiny", "--testbeds", "--reps", "1", "--quiet", *grid,
                     "--out", str(first)]) == 0
    assert cli.main(["bench", "pareto", "--shapes", *SMALL, "--cases", "1", *grid, "--join",
                     str(first / "pareto.json"), "--out", str(second)]) == 0
    res = json.loads((second / "pareto.json").read_text())
    assert list(res["native"]) == ["tiny"] and list(res["testbed_runs"]) == ["small"]
    assert res["native"]["tiny"]["joined"] == str(first / "pareto.json") and "joined from" in res["header"]
    row = {r["setting"]: r for r in res["rows"]}["draft@0.5 tail=pooled-var"]
    assert row["speed"]["tiny"]["forward_ms"] > 0 and row["quality"]["small"]["videos"] == 1
    assert res["frontiers"]["tiny x small testbed"][0] == pareto._NATIVE
    capsys.readouterr()
    for extra in (["--shapes", "tiny"], ["--shapes", "--join", str(first / "pareto.txt")]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["bench", "pareto", "--testbeds", *grid, "--join", str(first / "pareto.json"), *extra,
                      "--out", str(tmp_path / "bad")])
        assert exit_info.value.code == 2
        assert "error: Expect" in capsys.readouterr().err


@pytest.mark.parametrize("measured", [0, 1])
def test_a_run_cut_off_keeps_the_settings_measured(tmp_path, monkeypatch, measured):
    """The tables are written after the native baselines and after every setting's forwards: a run stopped at
    setting ``measured + 1`` keeps the baselines and the settings before it."""
    pytest.importorskip("diffusers")
    natives = 2 if torch.cuda.is_available() else 1  # default SDPA, and cuDNN forced where there is CUDA
    calls = []

    def time_ms(fn, **kwargs):
        calls.append(1)
        if len(calls) == natives + measured + 1:
            raise RuntimeError("cut off")
        return 1.0

    from sparsevid.lab.bench import e2e

    monkeypatch.setattr(pareto, "time_ms", time_ms)  # the native forwards
    monkeypatch.setattr(e2e, "time_ms", time_ms)  # the settings' (e2e.time_sparse_forward)
    with pytest.raises(RuntimeError, match="cut off"):
        cli.main(["bench", "pareto", "--shapes", "tiny", "--testbeds", "--quiet", "--densities", "0.5", "0.25",
                  "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "pareto.json").read_text())["rows"]
    assert [r["speed"].get("tiny", {}).get("forward_ms") for r in rows] == [1.0, *[1.0] * measured,
                                                                           *[None] * (2 - measured)]


def test_no_cuda_skips_full_size_shapes_with_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(pareto.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(pareto, "measure_quality", lambda *a: pytest.fail("quality was not asked for"))
    assert cli.main(["bench", "pareto", "--testbeds", "--quiet", "--densities", "0.5", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "speed at wan1.3b-480p, wan14b-720p skipped: no CUDA" in printed
    assert (tmp_path / "pareto.png").exists() and "No frontier" in (tmp_path / "pareto.txt").read_text()


BAD = [
    "--densities 0",
    "--densities --masses",
    "--methods bogus",
    "--option bogus=1",
    "--option draft:bogus=1",
    "--option random:seed=1",
    "--option :seed=1",
    "--option budget",
    "--option draft:tail=bogus",
    "--option replan_every=0",
    "--option draft:replan_every=-1",
    "--option replan_every=x",
    "--tail bogus",
    "--methods finegrained --tail pooled-var",
    "--cases 0",
    "--steps 0",
    "--reps 0",
    "--frames 0",
    "--shapes bogus",
    "--testbeds medium",
    "--out {file}/out",
    "--record --benchmarks-md {file}/B.md",
    "--join {file}",
    "--join /nonexistent/pareto.json",
]


@pytest.mark.parametrize("line", BAD)
def test_bad_options_refused_before_any_work(line, tmp_path, capsys, monkeypatch):
    for name in ("measure_speed", "measure_quality"):
        monkeypatch.setattr(pareto, name, lambda *a, **k: pytest.fail("work started"))
    afile = tmp_path / "a_file"
    afile.write_text("")
    argv = ["bench", "pareto", "--out", str(tmp_path / "out"), *shlex.split(line.format(file=afile))]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
    assert len(err.strip().splitlines()[-1]) > 0


def test_a_setting_that_makes_no_sparse_call_is_refused():
    """A planner setting whose forward sparsevid computed nothing of would time native attention as that setting
    (bench e2e and bench pareto share the timing); native attention (method None) expects no sparse call."""
    import types

    from sparsevid.lab.bench.e2e import time_sparse_forward

    handle = types.SimpleNamespace(config=types.SimpleNamespace(method="draft"),
                                   stats=lambda: dict(sparse_calls=0, plans=0))
    model, scheduler = (lambda **inputs: (torch.zeros(1),)), types.SimpleNamespace(step_index=0)
    with pytest.raises(RuntimeError, match="counted none"):
        time_sparse_forward(model, {}, scheduler, handle, 1, 1, "cpu", "draft@0.1")
    handle.config.method = None
    _, row = time_sparse_forward(model, {}, scheduler, handle, 1, 1, "cpu", "native")
    assert row["forward_ms"] >= 0
