#!/bin/bash
cd /work/main
while pgrep -f "workdir runs/s12/frozen_tas" >/dev/null; do sleep 15; done
date; echo frozen trained
.venv/bin/python eval/suites.py quality --model frozen-tas=runs/s12/frozen_tas --baselines=none --no-plots --quiet --out runs/s12/frozen_tas_eval > runs/s12/frozen_tas_eval.log 2>&1
date; echo frozen evaluated
