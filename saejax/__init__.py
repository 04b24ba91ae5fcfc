"""saejax: interpretable sparse text embeddings in JAX/Flax.

The embedding layer is a TopK sparse autoencoder on a ModernBERT (or BERT-family) encoder,
trained end to end. See README.md for the commands and the design.
"""

__version__ = "0.1.0"
