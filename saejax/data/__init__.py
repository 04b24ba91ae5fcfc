"""Text in: everything between files of text and batches of token ids.

Owns the tokenizer loader (`tokenizer`), the record sources (JSONL pairs and triplets, BEIR
folders, HF datasets, TFDS, mixtures, BM25 hard negatives: `sources`), the resumable grain
pipeline that turns records into global token batches (`pipeline`), and BEIR evaluation splits in
memory (`beir`). Imports only the core modules (`saejax.errors`); it knows no model.
"""
