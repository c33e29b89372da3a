"""The command line's boundaries: a bad argument is one ``sparsevid ... error:`` line and status 2 before
any work, outputs are checked before the work that fills them, benchmarks record only when asked."""

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparsevid.lab import cli

CUDA = torch.cuda.is_available()
SRC = str(Path(__file__).resolve().parents[1] / "src")

# Bad arguments refused before any work (the cheap part of the 75 invocations tried in issue 23); each
# failed before with a traceback, ran with the value replaced, or errored after the work.
BAD = [
    "demo --no-testbed --device bogus",
    "demo --no-testbed --out {file}/out",
    "demo --testbed-steps 0 --methods dense --densities 1",
    "demo --no-testbed --methods bogus",
    "demo --no-testbed --densities nan",
    "eval --steps 0 --out out/cli/e",
    "eval --weights /nonexistent.safetensors --out out/cli/e",
    "eval --device bogus --out out/cli/e",
    "eval --capture-step 999 --stats --out out/cli/e",
    "eval --videos -1 --out out/cli/e",
    "eval --out {file}/out",
    "backends --device bogus",
    "bench kernel --shape custom --frames 0 --out out/cli/k",
    "bench kernel --densities 2 --out out/cli/k",
    "bench frontier --shape cpu-small --frames 0 --out out/cli/f",
    "bench frontier --shape cpu-small --heads 0 --out out/cli/f",
    "bench frontier --shape cpu-small --frames-file /nonexistent.pt --out out/cli/f",
    "bench frontier --shape cpu-small --device bogus --out out/cli/f",
    "bench frontier --shape cpu-small --out {file}/out",
    "bench e2e --model tiny-wan --steps -1 --out out/cli/b",
    "bench e2e --model tiny-wan --reps 0 --out out/cli/b",
    "bench e2e --model tiny-wan --frames 0 --out out/cli/b",
    "bench e2e --model tiny-wan --densities 2 --out out/cli/b",
    "bench e2e --model tiny-wan --gpus 2 --out out/cli/b",
    "bench e2e --model tiny-wan --replan-every 0 --out out/cli/b",
    "bench e2e --model tiny-wan --record --benchmarks-md {file}/B.md --out out/cli/b",
    "bench decode --batches 0 --out out/cli/d",
    "bench decode --threads 0 --out out/cli/d",
    "bench decode --weights /nonexistent --out out/cli/d",
    "bench decode --agreement 2 --out out/cli/d",
    "bench decode --frontier {file}/f.png --out out/cli/d",
]
CPU_ONLY = [  # valid on a CUDA machine (where they would run)
    "demo --no-testbed --device cuda",
    "eval --device cuda --out out/cli/e",
    "bench kernel --out out/cli/k",
    "bench frontier --shape wan14b-720p --out out/cli/f",
    "bench e2e --model wan2.1-1.3b --out out/cli/b",
]


@pytest.mark.parametrize("bench, shape", [("kernel", "wan14b-720p"), ("frontier", "cpu-small")])
def test_bench_problem_shapes_are_named_by_shape_not_preset(bench, shape, capsys):
    # `preset` names apply's frontier points; the bench problem sizes are shapes (as bench pareto's --shapes)
    args = cli.build_parser().parse_args(["bench", bench, "--shape", shape])
    assert args.shape == shape and not hasattr(args, "preset")
    code, _, err = run_cli(f"bench {bench} --preset {shape}", capsys)
    assert code == 2 and "unrecognized arguments: --preset" in err


def run_cli(line: str, capsys) -> tuple[int, str, str]:
    try:
        code = cli.main(shlex.split(line))
    except SystemExit as exit:
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("line", BAD + [pytest.param(c, marks=pytest.mark.skipif(CUDA, reason="runs on CUDA"))
                                        for c in CPU_ONLY])
def test_bad_arguments_are_one_error_line_and_status_2(line, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative --out folders land here
    (tmp_path / "file").write_text("a file where a folder is expected")
    code, _, err = run_cli(line.format(file=tmp_path / "file"), capsys)
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("sparsevid") and ": error: " in last, err
    assert not (tmp_path / "BENCHMARKS.md").exists()


def test_backends_on_a_device_missing_here_print_why(capsys):
    """Defect (issue 23): `backends --device cuda` on CPU torch was a traceback (its capability check)."""
    missing = f"cuda:{torch.cuda.device_count() + 1}"
    code, out, _ = run_cli(f"backends --device {missing}", capsys)
    assert code == 0 and f"backends on {missing}:" in out and f"there is no {missing} here" in out


def test_bench_records_only_when_asked():
    """Defect (issue 23): every bench subcommand appended to ./BENCHMARKS.md by default."""
    parser = cli.build_parser()
    for bench in cli._BENCHMARKS:
        assert parser.parse_args(["bench", bench]).record is False
        assert parser.parse_args(["bench", bench, "--record"]).record is True
        assert parser.parse_args(["bench", bench, "--no-record"]).record is False


def test_output_folders_are_made_before_any_work(tmp_path, monkeypatch):
    """Defect (issue 23): `bench decode --frontier PATH --out DIR` with DIR not made failed after the work."""
    from sparsevid.decoder import train

    made = []

    def first_work(*args, **kwargs):
        made.extend(p.is_dir() for p in (tmp_path / "out", tmp_path / "plots", tmp_path / "md"))
        raise RuntimeError("first piece of work")

    monkeypatch.setattr(train, "load_model", first_work)
    with pytest.raises(RuntimeError, match="first piece of work"):
        cli.main(["bench", "decode", "--out", str(tmp_path / "out"), "--frontier", str(tmp_path / "plots" / "f.png"),
                  "--record", "--benchmarks-md", str(tmp_path / "md" / "B.md")])
    assert made == [True, True, True]


def test_a_closed_pipe_ends_the_command_quietly():
    """Defect (issue 23): `sparsevid models | head` ended in a BrokenPipeError traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "sparsevid", "models"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": SRC})
    proc.stdout.close()  # the reader is gone before the first write
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_bench_e2e_reuse_alone_runs(tmp_path):
    """`--methods none` (reuse alone, native attention) was refused by sparsevid.apply after the native timing."""
    pytest.importorskip("diffusers")
    assert cli.main(["bench", "e2e", "--model", "tiny-wan", "--methods", "none", "--reuse", "replay:rate=0.3",
                     "--option", "budget=head", "--reps", "1", "--out", str(tmp_path)]) == 0


def test_bench_e2e_refuses_a_tail_setting_before_any_work(capsys):
    """``bench e2e --tail`` settings are checked with the rest before the model is built (a backend with no
    tail pass, a token-plan method)."""
    for extra in (["--backends", "flex"], ["--methods", "finegrained"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["bench", "e2e", "--model", "tiny-wan", "--tail", "pooled-var", *extra])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "error:" in err and ("no tail pass" in err or "BlockPlan" in err) and "native" not in err
