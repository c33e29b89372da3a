"""Hypothesis strategies shared by the tests."""

from hypothesis import strategies as st

from sparsevid import VideoLayout


@st.composite
def layouts(draw):
    block_size = draw(st.sampled_from([16, 32]))
    height, width = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    th = draw(st.integers(1, min(height, block_size)))
    tw = draw(st.integers(1, min(width, block_size // th)))
    return VideoLayout(
        frames=draw(st.integers(1, 3)),
        height=height,
        width=width,
        text_tokens=draw(st.integers(0, 40)),
        text_first=draw(st.booleans()),
        tile=draw(st.one_of(st.none(), st.just((th, tw)))),
        block_size=block_size,
    )
