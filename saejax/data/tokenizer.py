"""Tokenizers from a model directory or a tokenizer.json (the `tokenizers` library, no transformers).

A tokenizer and a model belong together: every id the tokenizer can emit must index a row of the
model's embedding table, so a mismatch is caught here, at load, not as garbage embeddings later.
"""

import os
from pathlib import Path

from tokenizers import Tokenizer

from saejax.errors import ConfigError


def load_tokenizer(path: str | os.PathLike, *, vocab_size: int | None = None) -> Tokenizer:
  """Load ``tokenizer.json`` from a directory (or the file itself) and check it fits the model.

  Args:
    path: a model directory holding tokenizer.json, or the path of a tokenizer.json.
    vocab_size: the model's embedding rows; every token id of the tokenizer must be below it.
      None leaves the check to where the tokenizer meets a model (saejax.retrieval.encode and
      saejax.hub.convert call `check_vocab`).
  """
  path = Path(path)
  file = path / "tokenizer.json" if path.is_dir() else path
  if not file.exists():
    raise ConfigError(f"no tokenizer.json at {file}")
  try:
    tok = Tokenizer.from_file(str(file))
  except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exception on bad files.
    raise ConfigError(f"{file} is not a valid tokenizer.json: {e}") from e
  if vocab_size is not None:
    check_vocab(tok, vocab_size, f"tokenizer {file}")
  return tok


def check_vocab(tok: Tokenizer, vocab_size: int, where: str = "the tokenizer") -> None:
  """Refuse a tokenizer that emits ids past the model's embedding table (added tokens included).

  JAX clamps an out-of-range gather index instead of failing, so a tokenizer from another model
  would otherwise run and return plausible-looking garbage.
  """
  check_max_id(max(tok.get_vocab(with_added_tokens=True).values()), vocab_size, where)


def check_max_id(largest: int, vocab_size: int, where: str) -> None:
  """The ConfigError of `check_vocab`, for any tokenizer whose largest id is known."""
  if largest >= vocab_size:
    raise ConfigError(f"{where} emits ids up to {largest} but the model has only {vocab_size} "
                      f"embedding rows (vocab_size={vocab_size}): tokenizer and model do not "
                      "belong together")


def pad_id(tok: Tokenizer) -> int:
  """The tokenizer's padding id: its padding settings, else its [PAD] / <pad> token."""
  if tok.padding is not None:
    return int(tok.padding["pad_id"])
  for name in ("[PAD]", "<pad>"):
    if (i := tok.token_to_id(name)) is not None:
      return i
  raise ConfigError("the tokenizer has no padding settings and no [PAD] or <pad> token")


def truncating_copy(tokenizer: Tokenizer, max_len: int) -> Tokenizer:
  """A copy that truncates to `max_len` tokens ([CLS]/[SEP] kept) and does not pad.

  A copy, because queries and documents need different budgets and the caller's tokenizer (MiniLM's
  pads to 128 by default) must not change under it. Training batches (saejax.data.pipeline) and
  encoding (saejax.retrieval.encode) both cut texts here, so texts are cut at inference the way they
  were in training.
  """
  copy = Tokenizer.from_str(tokenizer.to_str())
  copy.no_padding()
  copy.enable_truncation(max_length=max_len)
  return copy
