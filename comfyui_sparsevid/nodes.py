"""The "SparseVid Attention" node: a MODEL in, a patched clone out (the input model is not changed)."""

from __future__ import annotations

AUTO_TAIL = "auto"  # sparsevid.tail.AUTO, spelled here: the module imports sparsevid only when ComfyUI asks


class SparseVidAttention:
    """Sparse video self-attention for ComfyUI's Wan 2.1/2.2 (t2v, i2v, VACE, camera) and HunyuanVideo.

    Layers and steps that run dense call the attention ComfyUI runs anyway (Sage, flash, PyTorch),
    as do cross-attention and text attention. An unsupported model raises an error naming it.
    """

    CATEGORY = "sparsevid"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    DESCRIPTION = __doc__

    @classmethod
    def INPUT_TYPES(cls):
        import sparsevid
        from sparsevid.backends import backend_names
        from sparsevid.config import DEFAULT_DENSE_STEP_FRACTION, SparseVidConfig
        from sparsevid.tail import AUTO, CLUSTER_TAIL, TAIL_METHODS

        defaults = SparseVidConfig()

        return {
            "required": {
                "model": ("MODEL",),
                "method": (sparsevid.available_planners(), {"default": defaults.method}),
                "budget": (["density", "mass"], {"default": "density",
                                                 "tooltip": "density: fraction of attention entries computed; "
                                                            "mass: attention probability kept (draft, xattn)"}),
                "amount": ("FLOAT", {"default": 0.1, "min": 0.01, "max": 1.0, "step": 0.01}),
                "dense_steps": ("FLOAT", {"default": DEFAULT_DENSE_STEP_FRACTION, "min": 0.0, "max": 0.99, "step": 0.01,
                                          "tooltip": "leading fraction of the sampling steps run dense (from the "
                                                     "sampler's sigmas)"}),
                "dense_layers": ("INT", {"default": defaults.dense_layers, "min": 0, "max": 200,
                                         "tooltip": "leading video self-attention layers run dense"}),
                "replan_every": ("INT", {"default": 0, "min": 0, "max": 100,
                                         "tooltip": "recompute each layer's plan every this many steps; 0: the "
                                                    "method's default (clustered: 4, the others: 1)"}),
                "backend": (backend_names(), {"default": defaults.backend}),
            },
            "optional": {
                "tail": ([AUTO, "none", *TAIL_METHODS, CLUSTER_TAIL.name],
                         {"default": AUTO,
                          "tooltip": "auto: the method's default (the cluster tail for clustered, none for the "
                                     "others); none: skipped keys dropped; pooled-var: each skipped block kept in "
                                     "the softmax as one summary (mean key, log n, clipped key variance; mean "
                                     "value); pooled-var-32: one summary per 32 keys; centroid: one term per "
                                     "dropped key cluster (clustered)"}),
            },
        }

    def patch(self, model, method, budget, amount, dense_steps, dense_layers, replan_every, backend, tail=AUTO_TAIL):
        from sparsevid.integrations.comfyui import apply

        density, mass = (amount, None) if budget == "density" else (None, amount)
        if method == "dense":
            density = mass = None
        return (apply(model, method, density, mass=mass, dense_steps=dense_steps, dense_layers=dense_layers,
                      replan_every=replan_every or None, backend=backend, tail=None if tail == "none" else tail),)


NODE_CLASS_MAPPINGS = {"SparseVidAttention": SparseVidAttention}
NODE_DISPLAY_NAME_MAPPINGS = {"SparseVidAttention": "SparseVid Attention"}
