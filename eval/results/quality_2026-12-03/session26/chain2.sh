#!/bin/bash
# Session 26, second form: chain.sh's first sparse run re-read only stage 1's pairs in its 200
# stage-2 steps (200 x 32 < 8,192), so stage 2 had no contrastive signal; killed at step ~40.
# This one loads that run's stage 1 (the dense-ft encoder's pairs) and reads past them.
set -e
cd /work/main
date -u +"sparse2 train start %T" >> runs/s26/chain.times
.venv/bin/python -m saejax.train --config configs/quality.py:sparse,200 \
  --config.model.init_from=runs/s26/dense_hf \
  --config.warmstart.init_from=runs/s26/from_dense --config.warmstart.fresh_stage2=True \
  --workdir runs/s26/from_dense2 > runs/s26/from_dense2.log 2>&1
date -u +"eval start %T" >> runs/s26/chain.times
.venv/bin/python eval/suites.py quality --model sparse=runs/s26/from_dense2 \
  --encoder-of=sparse-encoder=runs/s26/from_dense2 --baselines=none --no-plots --quiet \
  --out runs/s26/from_dense2_eval > runs/s26/from_dense2_eval.log 2>&1
date -u +"eval end %T" >> runs/s26/chain.times
