"""The decoder product: FastCar MLP replay for autoregressive Llama-family decoders of video tokens
(:mod:`.fastcar` through ``transformers`` hooks, :mod:`.fastcar_graph` as a static CUDA-graph decoder), its MLP
kernels (:mod:`.triton_mlp`), test model and weights (:mod:`.train`, ``weights/``) and benchmark (:mod:`.bench`,
``python -m sparsevid bench decode``). It may import the library; neither the attention core nor ``sv.apply``
imports it (docs/architecture.md)."""
