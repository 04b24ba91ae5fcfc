"""Models on disk, and a model from a training config.

Owns Hugging Face <-> saejax conversion and saejax's encoder checkpoints (`convert`, plus the
demo on the pretrained MiniLM: `demo`), the one place a training config becomes typed dataclasses
and an `Embedder` (`build`), a run's state as its checkpoints hold it (`state`: `TrainState`, the
optimiser), sealed training checkpoints (`checkpoint`), loading a trained run (`trained`), and
sentence-transformers SparseEncoder export and import (`export`), and a run's codes of a whole
corpus as one sparse index, encoded over every local device and every process, resumable
(`corpus`, ``python -m saejax.hub.corpus``). Imports `retrieval`, `sae`,
`models`, `data` and the core modules, never the trainer: training, evaluation, export and
interpretation all build and load models through here.
"""
