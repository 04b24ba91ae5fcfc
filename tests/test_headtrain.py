"""Head training's batch order: shuffled epochs, or every batch from one group (source)."""

import collections

import numpy as np
import pytest

from saejax.errors import ConfigError
from saejax.train.headtrain import HeadTrainConfig, batches


def test_plain_batches_cover_each_epoch_once():
  cfg = HeadTrainConfig(steps=6, batch_size=4)
  got = list(batches(13, cfg))  # 3 full batches per epoch, the 13th row's tail dropped
  for epoch in (got[:3], got[3:]):
    rows = np.concatenate(epoch)
    assert len(set(rows)) == 12 and rows.max() < 13


def test_group_batches_hold_one_group_drawn_by_size():
  groups = np.repeat([0, 1, 2], [600, 200, 3])  # group 2 is smaller than a batch: pooled
  cfg = HeadTrainConfig(steps=400, batch_size=8, seed=1)
  got = list(batches(len(groups), cfg, groups))
  assert all(len(b) == 8 for b in got)
  kinds = collections.Counter(tuple(sorted(set(groups[b]))) for b in got)
  assert set(kinds) == {(0,), (1,)}  # group 2's 3 rows cannot fill a batch of 8: never drawn
  assert kinds[(0,)] / 400 == pytest.approx(0.75, abs=0.07)  # 600 : 200 rows
  # Within a group, a pass takes each row once before any repeats.
  ones = np.concatenate([b for b in got if groups[b[0]] == 1])
  first_pass = ones[:200 // 8 * 8]
  assert len(set(first_pass)) == len(first_pass)


def test_small_groups_are_pooled_into_one_mixed_group():
  groups = np.repeat([0, 1, 2], [40, 5, 5])  # 1 and 2 alone cannot fill 8; together they can
  got = list(batches(len(groups), HeadTrainConfig(steps=200, batch_size=8), groups))
  mixed = [b for b in got if groups[b[0]] != 0]
  assert mixed and all(set(groups[b]) <= {1, 2} for b in mixed)
  assert any(set(groups[b]) == {1, 2} for b in mixed)


def test_groups_must_match_the_pairs():
  with pytest.raises(ConfigError, match=r"groups of shape \(5,\) for 10 pairs"):
    next(batches(10, HeadTrainConfig(steps=1, batch_size=2), np.zeros(5, int)))
