"""NumPy reference of `saejax.retrieval.index`'s idf-weighted cosine, for the evaluation tests."""

import numpy as np

from saejax.retrieval.index import IDF_POWER


def idf_weighted(q: np.ndarray, d: np.ndarray, power: float = IDF_POWER
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Dense [rows, S] query and document codes as the index scores them: every latent times
  ln((N + 1) / (df + 0.5))^power, df over the documents d, each row back to its own norm."""
  idf = np.log((len(d) + 1) / ((d != 0).sum(0) + 0.5)) ** power

  def weigh(x):
    y = x * idf
    before = np.linalg.norm(x, axis=1, keepdims=True)
    after = np.linalg.norm(y, axis=1, keepdims=True)
    return y * np.divide(before, after, out=np.zeros_like(before), where=after > 0)

  return weigh(q), weigh(d)
