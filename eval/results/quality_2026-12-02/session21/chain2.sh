#!/bin/bash
# waits for chain1 (the 600-step benchmark), then the sparse arm with 4x larger stage-2 batches
cd /work/main
while ! grep -q done runs/s21/chain1.times 2>/dev/null; do sleep 20; done
R=runs/s21/b128
date -u +"start %T" > runs/s21/chain2.times
.venv/bin/python -m saejax.train --config configs/quality.py:sparse --config.data.global_batch_size=128 --workdir $R > runs/s21/b128.log 2>&1
date -u +"trained %T rc=$?" >> runs/s21/chain2.times
.venv/bin/python eval/suites.py quality --model b128=$R --baselines=none --no-plots --quiet --out runs/s21/b128_eval > runs/s21/b128_eval.log 2>&1
date -u +"evaluated %T rc=$?" >> runs/s21/chain2.times
.venv/bin/python benchmarks/health.py --run $R > runs/s21/b128_health.log 2>&1
date -u +"health %T rc=$?" >> runs/s21/chain2.times
