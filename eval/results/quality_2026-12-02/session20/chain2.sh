#!/bin/bash
cd /work/main
while ! grep -q "^health" runs/s20/chain1.times; do sleep 20; done
R=runs/s20/bandsae600
date -u +"start %T" > runs/s20/chain2.times
.venv/bin/python -m saejax.train --config configs/quality.py:sparse,600 --config.loss.band_to_encoder=False --config.warmstart.init_from=runs/s20/band600fix --workdir $R > runs/s20/bandsae600.log 2>&1
date -u +"trained %T rc=$?" >> runs/s20/chain2.times
.venv/bin/python eval/suites.py quality --model bandsae600=$R --baselines=none --no-plots --quiet --out runs/s20/bandsae600_eval > runs/s20/bandsae600_eval.log 2>&1
date -u +"evaluated %T rc=$?" >> runs/s20/chain2.times
.venv/bin/python benchmarks/health.py --run $R > runs/s20/bandsae600_health.log 2>&1
date -u +"health %T rc=$?" >> runs/s20/chain2.times
