#!/bin/bash
cd /work/main
R=runs/s20/band600fix
date -u +"start %T" > runs/s20/chain1.times
.venv/bin/python -m saejax.train --config configs/quality.py:sparse,600 --workdir $R > runs/s20/band600fix.log 2>&1
date -u +"trained %T rc=$?" >> runs/s20/chain1.times
.venv/bin/python eval/suites.py quality --model band600fix=$R --baselines=none --no-plots --quiet --out runs/s20/band600fix_eval > runs/s20/band600fix_eval.log 2>&1
date -u +"evaluated %T rc=$?" >> runs/s20/chain1.times
.venv/bin/python benchmarks/health.py --run $R > runs/s20/band600fix_health.log 2>&1
date -u +"health %T rc=$?" >> runs/s20/chain1.times
