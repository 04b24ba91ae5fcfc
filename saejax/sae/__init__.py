"""The sparse embedding head: the TopK sparse autoencoder, the Embedder and the losses.

Owns the TopK SAE and its training invariants as pure functions (`topk`), the `Embedder` that
everything downstream loads (encoder + masked mean pool + SAE: `embedder`), and the losses, pure
functions of arrays returning ``(scalar, metrics)`` (`losses`, `chunked_nce`). Imports `models`
and the core modules only.
"""
