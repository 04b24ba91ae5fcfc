"""Serving: texts to codes, codes to ranked documents.

Owns bucketed, jitted corpus encoding (`encode`), the exact sparse inverted index and its numba
kernels plus the Seismic adapter and `sparse_matrix` (`index`, `index_kernels`), and external
engines (Milvus, Anserini/Seismic JSONL: `engines`). Imports `sae`, `data` and the core modules;
it takes a model object and never reads a checkpoint.
"""
