#!/bin/bash
# Session 25: the benchmark's frozen arm with warmstart.fresh_stage2, stage 1 from wd1 (the same
# stage 1 the sparse arm loads), scored with idf 0.5.
set -e
cd /work/main
date -u +"frozen train start %T" >> runs/s25/chain.times
.venv/bin/python -m saejax.train --config configs/quality.py:frozen \
  --config.warmstart.init_from=runs/s22/wd1 --config.warmstart.fresh_stage2=True \
  --workdir runs/s25/frozen > runs/s25/frozen.log 2>&1
date -u +"frozen eval start %T" >> runs/s25/chain.times
.venv/bin/python eval/suites.py quality --model frozen=runs/s25/frozen --baselines=none \
  --no-plots --quiet --out runs/s25/frozen_eval > runs/s25/frozen_eval.log 2>&1
date -u +"frozen eval end %T" >> runs/s25/chain.times
