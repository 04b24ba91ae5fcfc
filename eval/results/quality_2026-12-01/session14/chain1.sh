#!/bin/bash
cd /work/main
date
.venv/bin/python -m saejax.train --config configs/quality.py:sparse,600 --workdir runs/s14/sparse600 > runs/s14/sparse600.log 2>&1
date
.venv/bin/python eval/suites.py quality --model sparse600=runs/s14/sparse600 --baselines=none --no-plots --quiet --out runs/s14/sparse600_eval > runs/s14/sparse600_eval.log 2>&1
date
.venv/bin/python benchmarks/health.py --run runs/s14/sparse600 > runs/s14/sparse600_health.log 2>&1
date
