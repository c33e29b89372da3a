"""The project's own small video DiT, trained on the bundled real clips (issue 6).

    from sparsevid import testbed
    tb = testbed.load_pipeline()                      # CUDA (bfloat16) when present, else CPU (float32)
    tb.labels                                         # ('bigbuckbunny', 'bikes', 'carphone', 'carphone_distorted')
    video = tb(label=tb.labels[0], seed=0, steps=20)  # (16, 3, 64, 64) in [0, 1], deterministic per seed

    tbl = testbed.load_pipeline(name="large")         # testbed-l: 16 x 128 x 128 px = 16,384 video tokens
    video = tbl(label="bikes", seed=0, motion=testbed.Motion(pan_x=0.2, speed=2))   # (16, 3, 128, 128)

See :mod:`sparsevid.lab.testbed.model` for the architecture and :mod:`sparsevid.lab.testbed.train` for
how the committed weights were trained (``weights/testbed.json`` records the run).
"""

from .model import LABELS, SAMPLE, SPECS, TRANSFORMER_CONFIG, WEIGHTS
from .motion import Motion
from .pipeline import TestbedPipeline, load_pipeline

__all__ = ["LABELS", "SAMPLE", "SPECS", "TRANSFORMER_CONFIG", "WEIGHTS", "Motion", "TestbedPipeline", "load_pipeline"]
