#!/bin/bash
# Session 26: stage 2 started from the dense-ft encoder. The benchmark's dense arm (600 steps),
# its backbone exported to HF, then the sparse arm initialised from it (stage 1 recomputed on
# that encoder, a shorter joint stage 2 of 200 steps, stage 3), scored with idf 0.5 as in s24/s25.
set -e
cd /work/main
date -u +"dense train start %T" >> runs/s26/chain.times
.venv/bin/python -m saejax.train --config configs/quality.py:dense \
  --workdir runs/s26/dense > runs/s26/dense.log 2>&1
date -u +"export start %T" >> runs/s26/chain.times
.venv/bin/python -m saejax.hub.export --ckpt runs/s26/dense --out runs/s26/dense_hf \
  --backbone-only > runs/s26/export.log 2>&1
date -u +"sparse train start %T" >> runs/s26/chain.times
.venv/bin/python -m saejax.train --config configs/quality.py:sparse,200 \
  --config.model.init_from=runs/s26/dense_hf \
  --workdir runs/s26/from_dense > runs/s26/from_dense.log 2>&1
date -u +"eval start %T" >> runs/s26/chain.times
.venv/bin/python eval/suites.py quality --model sparse=runs/s26/from_dense \
  --encoder-of=sparse-encoder=runs/s26/from_dense --baselines=none --no-plots --quiet \
  --out runs/s26/from_dense_eval > runs/s26/from_dense_eval.log 2>&1
date -u +"eval end %T" >> runs/s26/chain.times
