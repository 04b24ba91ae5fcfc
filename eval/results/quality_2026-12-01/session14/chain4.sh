#!/bin/bash
cd /work/main
while pgrep -f chain1.sh > /dev/null; do sleep 10; done
date
.venv/bin/python eval/suites.py quality --encoder-of sparse600-encoder=runs/s14/sparse600 --baselines=none --no-plots --quiet --out runs/s14/sparse600_enc > runs/s14/sparse600_enc.log 2>&1
date
