"""saejax: interpretable sparse text embeddings in JAX/Flax.

The embedding layer is a TopK sparse autoencoder on a ModernBERT (or BERT-family) encoder,
trained end to end. See README.md for the commands and the design.

The package is layered, lowest first; a module imports from its own layer and from layers above
it in this list, never from one below, and nothing imports in a cycle
(tests/test_architecture.py holds the order and checks both):

  core       errors.py, cli.py, sharding.py, paths.py, hostmem.py: the exceptions, the one
             convention every command ends with, the mesh and the logical-axis rules that every
             weight and batch obeys, workdir paths on disk or in a bucket (gs://), the host
             allocator setting the training command starts with
  data       text to token batches: tokenizer, record sources, the grain pipeline, BEIR splits
  models     the encoders (ModernBERT, BERT), attention backends, parameter declarations and
             each model's tensor map; no file format, no training
  sae        the TopK SAE head, the Embedder (encoder + pooling + SAE) and the losses
  retrieval  encoding a corpus, the exact sparse index and its kernels, external engines
  hub        models on disk: Hugging Face conversion, a model built from a training config, a
             run's state and sealed checkpoints, loading a trained run, sentence-transformers
             export and import, a corpus encoded into an index over devices and hosts
  interpret  latent statistics, labels, query-time steering, the HTML explorer
  eval       retrieval evaluation: the post-training table, the BEIR harness and its reports,
             the MTEB adapter (``python -m saejax.eval``)
  train      the trainer: config schema, train step, loop, stage 1, multi-host runtime, compile
             checks, training curves (``python -m saejax.train``); nothing imports it
"""

__version__ = "0.1.0"
