#!/bin/bash
cd /work/main
date
.venv/bin/python -m saejax.train --config configs/quality.py:dense,600 --workdir runs/s15/dense600 > runs/s15/dense600.log 2>&1
date
.venv/bin/python eval/suites.py quality --model dense600=runs/s15/dense600 --baselines=none --no-plots --quiet --out runs/s15/dense600_eval > runs/s15/dense600_eval.log 2>&1
date
