#!/bin/bash
# Session 25: the benchmark's sparse arm with stage 2 reading past stage 1's 8,192 pairs
# (warmstart.fresh_stage2), stage 1 loaded from wd1 (same inputs), scored with idf 0.5 as in s24.
set -e
cd /work/main
date -u +"train start %T" >> runs/s25/chain.times
.venv/bin/python -m saejax.train --config configs/quality.py:sparse \
  --config.warmstart.init_from=runs/s22/wd1 --config.warmstart.fresh_stage2=True \
  --workdir runs/s25/fresh > runs/s25/fresh.log 2>&1
date -u +"eval start %T" >> runs/s25/chain.times
.venv/bin/python eval/suites.py quality --model sparse=runs/s25/fresh \
  --encoder-of=sparse-encoder=runs/s25/fresh --baselines=none --no-plots --quiet \
  --out runs/s25/fresh_eval > runs/s25/fresh_eval.log 2>&1
date -u +"eval end %T" >> runs/s25/chain.times
