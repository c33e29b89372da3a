"""sparsevid: sparse attention that makes video diffusion transformers fast, with no retraining.

    import sparsevid as sv
    layout = sv.VideoLayout(frames=21, height=30, width=52)
    plan = sv.plan(q, k, layout, method="draft", density=0.1)
    out = sv.sparse_attention(q, k, v, plan)
"""

from .attention import Backend, available_backends, describe_backends, sparse_attention
from .backends import register_backend
from .cluster_plan import ClusterPlan
from .layout import VideoLayout
from .plan import BlockPlan
from .planners import available_planners, plan, register_planner
from .token_plan import TokenPlan

__all__ = [
    "Backend",
    "apply",
    "remove",
    "BlockPlan",
    "ClusterPlan",
    "TokenPlan",
    "VideoLayout",
    "available_backends",
    "describe_backends",
    "register_backend",
    "available_planners",
    "plan",
    "register_planner",
    "sparse_attention",
]
__version__ = "0.1.0"


def __getattr__(name):
    # apply/remove need diffusers (an optional extra): import it only when they are used.
    if name in ("apply", "remove"):
        from .integrations import diffusers

        return getattr(diffusers, name)
    if name == "reuse":
        import sparsevid.reuse  # not `from . import reuse`: its fromlist asks this __getattr__ again

        return sparsevid.reuse
    # the lab's trained testbed, ``from sparsevid import testbed`` (DESIGN.md): the one door from the package face
    # into the lab, declared in tests/test_architecture.py
    if name == "testbed":
        from .lab import testbed

        return testbed
    raise AttributeError(f"module 'sparsevid' has no attribute {name!r}")
