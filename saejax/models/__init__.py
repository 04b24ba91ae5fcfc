"""The encoders: ModernBERT and the BERT family in Flax NNX.

Owns the model modules (`modernbert`, `bert`), the one attention entry point and its backends
(`attention`, `splash`), the GPU LayerNorm kernels (`fused_norm`), how every weight is declared
with logical axes (`params`), and each family's description for the converters (`architecture`:
config class, builder, one `TensorMap` row per weight). Imports only the core modules (errors,
the sharding rules); a model knows no file format and no trainer: reading and writing weights is
`saejax.hub.convert`'s job.
"""
