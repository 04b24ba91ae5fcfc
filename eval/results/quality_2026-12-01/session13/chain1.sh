#!/bin/bash
cd /work/main
while pgrep -f "workdir runs/s13/sparse_tas" >/dev/null; do sleep 15; done
date; echo sparse trained
.venv/bin/python eval/suites.py quality --model sparse-tas=runs/s13/sparse_tas --baselines=none --no-plots --quiet --out runs/s13/sparse_tas_eval > runs/s13/sparse_tas_eval.log 2>&1
date; echo sparse evaluated
.venv/bin/python benchmarks/health.py --run runs/s13/sparse_tas > runs/s13/sparse_tas_health.log 2>&1
date; echo health done
