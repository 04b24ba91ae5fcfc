"""What the latents mean: statistics, labels, steering and the feature explorer.

Owns latent statistics, families, top documents, token evidence and model fingerprints
(`latents`), c-TF-IDF labels with held-out AUC (`labels`), query-time steering (`steer`) and the
static HTML explorer (`explorer` and its page template). Imports `hub` (to load a run),
`retrieval`, `sae`, `data` and the core modules; never evaluation or training.
"""
