#!/bin/bash
# the sparse arm (600 steps) with the dense InfoNCE term at full weight, stage 1 loaded from the
# benchmark's sparse arm (same inputs since b657ecc); then evaluation (with its encoder read
# densely) and health
cd /work/main
R=runs/s21/wd1
date -u +"start %T" > runs/s21/chain3.times
.venv/bin/python -m saejax.train --config configs/quality.py:sparse --config.loss.w_dense_contrastive=1.0 --config.warmstart.init_from=runs/quality600/sparse --workdir $R > runs/s21/wd1.log 2>&1
date -u +"trained %T rc=$?" >> runs/s21/chain3.times
.venv/bin/python eval/suites.py quality --model wd1=$R --encoder-of=wd1-encoder=$R --baselines=none --no-plots --quiet --out runs/s21/wd1_eval > runs/s21/wd1_eval.log 2>&1
date -u +"evaluated %T rc=$?" >> runs/s21/chain3.times
.venv/bin/python benchmarks/health.py --run $R > runs/s21/wd1_health.log 2>&1
date -u +"health %T rc=$?" >> runs/s21/chain3.times
