"""Command line: ``python -m sparsevid {demo, eval, models, backends, bench ...}``."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .bench.common import device_name

# subcommand -> module exposing add_arguments(parser) and run(args) -> int
_COMMANDS = {
    "demo": ("sparsevid.lab.demo", "what each planner keeps of the trained testbed's attention, and the clip it generates"),
    "eval": ("sparsevid.lab.eval", "generate dense and sparse videos with the testbed; PSNR/SSIM, per-layer error"),
}
_BENCHMARKS = {
    "kernel": ("sparsevid.lab.bench.kernel", "block-sparse attention kernel vs cuDNN/flash SDPA and FlexAttention"),
    "frontier": ("sparsevid.lab.bench.frontier", "output error vs kernel speed of every planner at several densities"),
    "e2e": ("sparsevid.lab.bench.e2e", "full-size video transformers (random weights): native vs sparsevid forward and loop"),
    "pareto": ("sparsevid.lab.bench.pareto", "quality-vs-speed frontier: testbed PSNR/SSIM vs Wan forward speedup per setting"),
    "decode": ("sparsevid.decoder.bench", "FastCar MLP replay in AR video decoding: throughput, token agreement, PSNR"),
}


def _add(subparsers, name, module, help_text):
    parser = subparsers.add_parser(name, help=help_text, description=help_text)
    mod = importlib.import_module(module)
    mod.add_arguments(parser)
    parser.set_defaults(_run=mod.run)


def _print_models(args) -> int:
    from ..integrations.models import markdown_table

    print(markdown_table())
    return 0


def _print_backends(args) -> int:
    import torch

    from ..backends import describe_backends

    device = args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = describe_backends(device)
    keys = ["name", "usable", "plans", "dtypes", "head_dims", "block_sizes", "gpu_majors", "backward", "priority"]
    print(f"backends on {device}:")
    print("| " + " | ".join(keys) + " | why not |\n|" + "---|" * (len(keys) + 1))
    for r in rows:
        print("| " + " | ".join(str(r[k]) for k in keys) + f" | {r['reason'] or '-'} |")
    return 0


class _Parser(argparse.ArgumentParser):
    """A parser whose usage errors are one line, ``sparsevid [command] error: ...`` (status 2), as the
    commands' own errors are (``--help`` shows the usage); subcommand parsers are of this class too."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sparsevid", description="Sparse attention for video diffusion transformers.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in _COMMANDS.items():
        _add(commands, name, module, help_text)
    models = commands.add_parser("models", help="supported and refused diffusers transformer classes (markdown)")
    models.set_defaults(_run=_print_models)
    backends = commands.add_parser("backends", help="registered attention backends, their capabilities, usable here")
    backends.add_argument("--device", type=device_name, default=None,
                          help="device to check, present here or not (default: cuda when present, else cpu)")
    backends.set_defaults(_run=_print_backends)
    bench = commands.add_parser("bench", help="GPU benchmarks", description="GPU benchmarks")
    benches = bench.add_subparsers(dest="benchmark", required=True)
    for name, (module, help_text) in _BENCHMARKS.items():
        _add(benches, name, module, help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a command; a bad setting (``ValueError``/``TypeError`` raised while checking the inputs)
    prints one line and exits with status 2, like argparse (``SPARSEVID_TRACEBACK=1`` shows the traceback).
    A reader that stops early (``sparsevid models | head``) ends the command quietly."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args._run(args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's flush at exit
        return code
    except BrokenPipeError:
        # nothing more can be written: point stdout at /dev/null so that the exit flush stays quiet
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (ValueError, TypeError) as error:
        if os.environ.get("SPARSEVID_TRACEBACK") == "1":
            raise
        parser.exit(2, f"sparsevid: error: {error}\n")


if __name__ == "__main__":
    sys.exit(main())
