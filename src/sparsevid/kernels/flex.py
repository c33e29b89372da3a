"""The ``flex`` backend: FlexAttention with the plan's ``BlockMask`` on tensors gathered into tile
order — a maintained block-sparse kernel to compare against (only when named; eager here, wrap the
caller in ``torch.compile`` for speed)."""

from __future__ import annotations

from ..backends import register_backend
from ..plan import BlockPlan


@register_backend(
    # torch's FlexAttention has no backward on the CPU
    "flex", plans=(BlockPlan,), devices=("cpu", "cuda"), backward=("cuda",), priority=0,
    description="torch FlexAttention on gathered tile-order tensors (comparison; never picked by auto)",
)
def _flex_backend(q, k, v, plan, scale):
    from torch.nn.attention.flex_attention import flex_attention

    layout = plan.layout
    gathered = [layout.to_tiles(t) for t in (q, k, v)]
    out = flex_attention(*gathered, block_mask=plan.to_block_mask(), scale=scale)
    return layout.from_tiles(out)
