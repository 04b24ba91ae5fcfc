"""Head training's batch order: shuffled epochs, or batches made of parts from one group each (a
source, or a k-means topic of the pairs' embeddings)."""

import collections

import numpy as np
import pytest

from saejax.errors import ConfigError
from saejax.train.headtrain import HeadTrainConfig, batches, topic_groups


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


def test_batches_in_parts_take_each_part_from_a_distinct_group_by_size():
  groups = np.repeat([0, 1, 2, 3], [400, 200, 200, 2])  # group 3 cannot fill a part of 4: unused
  cfg = HeadTrainConfig(steps=500, batch_size=8, seed=2, groups_per_batch=2)
  got = list(batches(len(groups), cfg, groups))
  assert all(len(b) == 8 for b in got)
  parts = [(groups[b[:4]], groups[b[4:]]) for b in got]
  assert all(len(set(a)) == 1 and len(set(b)) == 1 and a[0] != b[0] for a, b in parts)
  used = collections.Counter(g for a, b in parts for g in (a[0], b[0]))
  assert set(used) == {0, 1, 2}
  # Two distinct groups per batch, drawn by size 2:1:1 without replacement: group 0 is in a batch
  # with probability 1/2 + 1/4 * 2/3 * 2 = 5/6.
  assert used[0] / 500 == pytest.approx(5 / 6, abs=0.05)
  with pytest.raises(ConfigError, match=r"1 groups of >= 4 pairs, fewer than groups_per_batch=2"):
    next(batches(20, cfg, np.repeat([0, 1], [18, 2])))
  with pytest.raises(ConfigError, match=r"groups_per_batch=3 must be >= 1 and divide batch_size=8"):
    HeadTrainConfig(batch_size=8, groups_per_batch=3)


def test_topic_groups_recover_planted_topics():
  """Pairs planted around three unit directions (query and document each near their topic's, with
  noise) come back as three topics, whatever the clusters' numbering."""
  rng = np.random.default_rng(0)
  centres = np.linalg.qr(rng.normal(size=(16, 3)))[0].T  # three orthonormal directions
  truth = rng.integers(0, 3, 300)
  noisy = lambda: centres[truth] + 0.3 * rng.normal(size=(300, 16)) / 4  # noqa: E731
  q, d = noisy(), 5.0 * noisy()  # the scale of an embedding does not matter
  found = topic_groups(q, d, 3, seed=0)
  assert len(set(found)) == 3
  for t in range(3):
    assert len(set(found[truth == t])) == 1
  with pytest.raises(ConfigError, match=r"topics=0 must be in \[1, 300 pairs\]"):
    topic_groups(q, d, 0)
