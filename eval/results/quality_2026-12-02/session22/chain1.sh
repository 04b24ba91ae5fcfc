#!/bin/bash
# the sparse arm (600 steps) with the dense InfoNCE term at full weight (stage 1 built afresh: the
# session-21 benchmark run is not on this checkout); then evaluation (with its encoder read
# densely) and health
cd /work/main
R=runs/s22/wd1
date -u +"start %T" > runs/s22/chain1.times
.venv/bin/python -m saejax.train --config configs/quality.py:sparse --config.loss.w_dense_contrastive=1.0 --workdir $R > runs/s22/wd1.log 2>&1
date -u +"trained %T rc=$?" >> runs/s22/chain1.times
.venv/bin/python eval/suites.py quality --model wd1=$R --encoder-of=wd1-encoder=$R --baselines=none --no-plots --quiet --out runs/s22/wd1_eval > runs/s22/wd1_eval.log 2>&1
date -u +"evaluated %T rc=$?" >> runs/s22/chain1.times
.venv/bin/python benchmarks/health.py --run $R > runs/s22/wd1_health.log 2>&1
date -u +"health %T rc=$?" >> runs/s22/chain1.times
