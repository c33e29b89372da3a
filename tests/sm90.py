"""Compile a Triton kernel for sm_90 on a machine without a GPU: what the interpreter runs, the compiler may refuse.

``compile_sm90(snippet)`` runs ``snippet`` in a fresh process without ``TRITON_INTERPRET`` after a prelude that
defines ``build(fn, pointers, constants, **options)``: ``fn`` compiled for an H100 (sm_90) with the ptxas Triton
ships, pointer types from ``pointers`` (by argument name; ``i32`` for the rest), ``constants`` as constexprs.
Returns the finished process; a failed compile is an assertion error carrying the compiler's message.
"""

import os
import subprocess
import sys

_PRELUDE = """
from triton import compile
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

def build(fn, pointers, constants, **options):
    signature = {n: "constexpr" if n in constants else pointers.get(n, "i32") for n in fn.arg_names}
    return compile(ASTSource(fn, signature, constants), target=GPUTarget("cuda", 90, 32), options=options)
"""


def compile_sm90(snippet: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    run = subprocess.run([sys.executable, "-c", _PRELUDE + snippet], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return run
