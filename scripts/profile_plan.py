"""Where planning time goes on the GPU: each planner timed as the hot path calls it, and a
torch.profiler table of the draft planner. ``PYTHONPATH=src python3 scripts/profile_plan.py``."""

import sys

import torch

import sparsevid as sv
from sparsevid.lab import data
from sparsevid.lab.bench.common import time_ms


layout = sv.VideoLayout(21, 30, 52)
try:
    q, k, v = data.attention_inputs("bigbuckbunny", layout, heads=12, head_dim=128, dtype=torch.bfloat16, device="cuda")
except Exception as exc:  # noqa: BLE001
    print("clip inputs unavailable, random:", exc)
    q, k, v = (torch.randn(1, 12, layout.num_tokens, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
for method, opts in [("draft", {}), ("draft", {"budget": "row"}), ("xattn", {}), ("window", {}), ("random", {}),
                     ("finegrained", {})]:
    fn = lambda: sv.plan(q, k, layout, method=method, density=0.1, validate=False, **opts)  # noqa: E731
    plan = fn()
    attn = time_ms(lambda: sv.sparse_attention(q, k, v, plan))
    print(f"{method:12s} {str(opts):20s} plan {time_ms(fn):7.3f} ms   attention {attn:7.3f} ms", flush=True)

from torch.profiler import ProfilerActivity, profile  # noqa: E402

fn = lambda: sv.plan(q, k, layout, method="draft", density=0.1, validate=False)  # noqa: E731
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15), file=sys.stdout)
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15), file=sys.stdout)
