"""What every benchmark shares: CUDA-event timing, the environment line, BENCHMARKS.md rows."""

from __future__ import annotations

import argparse
import ast
import datetime
import shlex
import statistics
import sys
import time

import torch


def option_pair(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` -> ``(KEY, value)``: the ``--option`` type of the CLIs. VALUE is a Python literal
    (``32``, ``(8, 16)``, ``'layer'``) or a bare word taken as a string (``budget=layer``: what a shell
    leaves of ``budget='layer'``)."""
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier() or not value:
        raise argparse.ArgumentTypeError(f"Expect --option KEY=VALUE but got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        if value.isidentifier():
            return key, value
        raise argparse.ArgumentTypeError(
            f"Expect --option KEY=VALUE with VALUE a Python literal or a plain word but got {text!r}") from None


def time_ms(fn, reps: int = 10, warmup: int = 2, device: str = "cuda") -> float:
    """Median milliseconds of ``reps`` calls of ``fn`` after ``warmup`` calls.

    On CUDA each call sits between two CUDA events; on the CPU (smoke tests only) a host clock.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def environment() -> str:
    """``date — device, torch, triton, CUDA`` for a results header."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    return (
        f"{datetime.date.today().isoformat()} — {device}, torch {torch.__version__}, triton {triton_version}, "
        f"CUDA {torch.version.cuda}"
    )


def command_line() -> str:
    """The command as a user would type it (``python -m sparsevid ...``)."""
    argv = sys.argv[1:]
    return "python -m sparsevid " + " ".join(shlex.quote(a) for a in argv)


def append_benchmarks(path: str, title: str, header: str, table: str, extra: str = "", command: str | None = None) -> None:
    """Append one results section (title, environment header, command, table, notes) to ``BENCHMARKS.md``.

    ``command`` defaults to this process's ``python -m sparsevid ...`` command line."""
    with open(path, "a") as f:
        if f.tell() == 0:
            f.write("# Benchmarks\n\nResults tables appended by the benchmark commands (newest last).\n")
        f.write(f"\n## {title}\n\n{header}\n\nCommand: `{command or command_line()}`\n\n{table}\n")
        if extra:
            f.write(f"\n{extra}\n")
    print(f"[bench] appended to {path}")


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float32."""
    return float((a.float() - b.float()).norm() / b.float().norm())


def fmt(x, spec: str) -> str:
    """``format(x, spec)``, or ``-`` for a missing or NaN value."""
    return "-" if x is None or (isinstance(x, float) and x != x) else format(x, spec)


def markdown_table(columns: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
