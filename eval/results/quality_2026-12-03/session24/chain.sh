#!/bin/bash
# Session 24: the benchmark's sparse arm (configs/quality.py:sparse as is) rerun on this VM from
# wd1's stage-1 head (same inputs: stage1.fingerprint checks), scored with idf 0.5.
set -e
cd /work/main
date -u +"train start %T" >> runs/s24/chain.times
.venv/bin/python -m saejax.train --config configs/quality.py:sparse \
  --config.warmstart.init_from=runs/s22/wd1 --workdir runs/s24/sparse > runs/s24/sparse.log 2>&1
date -u +"eval start %T" >> runs/s24/chain.times
.venv/bin/python eval/suites.py quality --model sparse=runs/s24/sparse \
  --encoder-of=sparse-encoder=runs/s24/sparse --baselines=none --no-plots --quiet \
  --out runs/s24/sparse_eval > runs/s24/sparse_eval.log 2>&1
date -u +"eval end %T" >> runs/s24/chain.times
