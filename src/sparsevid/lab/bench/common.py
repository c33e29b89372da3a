"""What every benchmark shares: CUDA-event timing, the environment line, BENCHMARKS.md rows; and what
every command shares: the argument types (a bad value is one usage error, before any work) and the
output checks."""

from __future__ import annotations

import argparse
import ast
import datetime
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


class _Values(argparse.Action):
    """A list option given as values and as repeated flags: ``--x a b`` and ``--x a --x b`` both give ``[a, b]``
    (the values replace the default), a repeated value counts once."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = getattr(namespace, self.dest)
        given = [] if given is self.default else given
        setattr(namespace, self.dest, list(dict.fromkeys([*given, *values])))


def add_tail_argument(parser: argparse.ArgumentParser, what: str) -> None:
    """``--tail METHOD ...``: values of ``tail=``, one configuration each (``none``: the skipped blocks dropped);
    ``args.tail`` is their list with ``none`` as ``None``, each once; a repeated ``--tail`` adds its values.
    ``what``: what a value adds, for the help."""
    from ...tail import AUTO, CLUSTER_TAIL, TAIL_METHODS

    names = ("none", AUTO, CLUSTER_TAIL.name, *TAIL_METHODS)

    def tail_value(text: str) -> str | None:
        if text not in names:
            raise argparse.ArgumentTypeError(f"Expect --tail in {', '.join(names)} but got {text!r}")
        return None if text == "none" else text

    parser.add_argument("--tail", nargs="+", type=tail_value, default=[None], action=_Values,
                        metavar="{" + ",".join(names) + "}",
                        help=f"{what}: none (the skipped keys dropped), auto (the plan type's default: the cluster tail for "
                             "clustered plans, none otherwise), centroid (clustered plans) or a summary method of "
                             "sparsevid.tail; "
                             "repeatable, each value once (default: none)")


_REUSE_SPEC = ("replay:rate=0.3 | replay:threshold=T | fbc:threshold=0.05 | taylorseer:cache_interval=5,use_lite_mode=True"
               " | magcache:KEY=VALUE,...; '+' joins several into one setting (replay:rate=0.1+fbc:threshold=0.1)")


# ---------------------------------------------------------------------------------------- argument groups
def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """``--device``: a device of this machine for the commands that compute (default: cuda when present, else cpu)."""
    parser.add_argument("--device", type=local_device, default=None,
                        help="torch device (default: cuda when available, else cpu)")


def add_size_arguments(parser: argparse.ArgumentParser) -> None:
    """``--frames``, ``--height``, ``--width`` of the testbed's videos (default: its native size)."""
    for name, what in (("frames", "frames"), ("height", "height in px"), ("width", "width in px")):
        parser.add_argument(f"--{name}", type=positive_int, default=None, help=f"{what} (default: the testbed's native)")


def add_budget_arguments(parser: argparse.ArgumentParser, methods: list[str], densities: list[float], *,
                         methods_help: str = "planners", nargs: str = "+", masses: str | None = None) -> None:
    """``--methods``, ``--densities`` (fractions, checked as the planners check them) and, where ``masses`` says what
    one adds, ``--masses``: the planners and budgets a command sweeps."""
    parser.add_argument("--methods", nargs="+", default=methods, help=f"{methods_help} (default: %(default)s)")
    parser.add_argument("--densities", type=fraction, nargs=nargs, default=densities,
                        help="densities (default: %(default)s)")
    if masses is not None:
        parser.add_argument("--masses", type=fraction, nargs=nargs, default=[], help=masses)


def add_quant_argument(parser: argparse.ArgumentParser, what: str, nargs: str = "+") -> None:
    """``--quant MODE ...``: 8-bit modes of ``sparse_attention`` (``quant=``), ``what`` each adds."""
    from ...backends import QUANT_MODES

    parser.add_argument("--quant", nargs=nargs, choices=list(QUANT_MODES), default=[], help=what)


def add_option_argument(parser: argparse.ArgumentParser, what: str) -> None:
    """``--option KEY=VALUE`` (repeatable): planner options; ``args.option`` is a list of pairs."""
    parser.add_argument("--option", action="append", type=option_pair, default=[], metavar="KEY=VALUE",
                        help=f"{what}, repeatable (e.g. --option block_size=32)")


def add_reuse_argument(parser: argparse.ArgumentParser, what: str) -> None:
    """``--reuse SPEC`` (repeatable): temporal reuse settings (:mod:`sparsevid.reuse.spec`); ``what`` they do."""
    parser.add_argument("--reuse", action="append", default=[], metavar="SPEC",
                        help=f"temporal reuse, repeatable: {what}. SPEC: {_REUSE_SPEC}")


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


def _int_at_least(minimum: int, name: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"Expect an int >= {minimum} but got {text!r}")
        return value

    parse.__name__ = name
    return parse


positive_int = _int_at_least(1, "positive_int")  # counts, sizes, repetitions
non_negative_int = _int_at_least(0, "non_negative_int")  # steps, indices, optional counts


def fraction(text: str) -> float:
    """A float in (0, 1] (densities, masses), checked as the planners check it."""
    from ...planners import _check_fraction

    try:
        value = float(text)
        _check_fraction("value", value)
    except (ValueError, TypeError):
        raise argparse.ArgumentTypeError(f"Expect a float in (0, 1] but got {text!r}") from None
    return value


def device_name(text: str) -> torch.device:
    """Any torch device, present here or not (``backends --device``: its table says why one is unusable)."""
    from ...backends import as_device

    try:
        return as_device(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def local_device(text: str) -> torch.device:
    """A torch device of this process: the ``--device`` of the commands that compute."""
    from ...backends import device_missing

    device = device_name(text)
    reason = device_missing(device)
    if reason is not None:
        raise argparse.ArgumentTypeError(f"Expect a device of this machine but {reason}; leave --device out "
                                         "for cuda when present, else cpu")
    return device


def existing_file(text: str) -> str:
    """The path of a file that exists (weights, saved frames)."""
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"Expect an existing file but got {text!r}"
                                         + (" (a folder)" if os.path.isdir(text) else ""))
    return text


def output_folder(path: str | os.PathLike, option: str = "--out") -> Path:
    """Create folder ``path`` (parents too) and check that a file can be written there: called before any
    work, so that results are never lost to a bad folder after it. Raises a ``ValueError`` naming ``option``."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as error:
        raise ValueError(f"Expect {option} to be a folder this process can write but {path}: "
                         f"{error.strerror or error}; pass another folder") from None
    return path


def output_file(path: str | os.PathLike, option: str) -> Path:
    """:func:`output_folder` for the folder of file ``path`` (which must not be a folder)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"Expect {option} to be a file path but {path} is a folder")
    output_folder(path.parent, f"the folder of {option}")
    return path


def add_record_arguments(parser: argparse.ArgumentParser) -> None:
    """``--record`` (off by default: a run never edits a file it was not asked to) and ``--benchmarks-md``."""
    parser.add_argument("--record", action=argparse.BooleanOptionalAction, default=False,
                        help="append the results table to --benchmarks-md")
    parser.add_argument("--benchmarks-md", default="BENCHMARKS.md",
                        help="the file --record appends to (default: %(default)s)")


def check_bench_outputs(args) -> None:
    """Before any work: ``--out`` created and writable, and with ``--record`` the folder of ``--benchmarks-md``."""
    output_folder(args.out)
    if args.record:
        output_file(args.benchmarks_md, "--benchmarks-md")


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
