"""sparsevid's ComfyUI custom nodes (this folder, symlinked or copied into ``ComfyUI/custom_nodes/``).

The nodes import the pip-installed ``sparsevid`` (``pip install sparsevid`` into ComfyUI's Python);
the logic lives in :mod:`sparsevid.integrations.comfyui`. Licensed GPL-3.0 (see LICENSE here),
like ComfyUI; the sparsevid library itself is Apache-2.0.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
