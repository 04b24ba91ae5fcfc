#!/bin/bash
# Session 27, after chain.sh: the sparse arm's evaluation group redone with this session's harness
# (encodings shared: its encoder read densely and SciFact's unseen claims reuse the sparse arm's
# encoding), so every group of the report is this code; session 24's group kept beside it.
set -e
cd /work/main
while pgrep -f "benchmarks/health.py" > /dev/null; do sleep 10; done
mv runs/s27/eval/sparse runs/s27/eval_sparse_s24
date -u +"sparse re-eval start %T" >> runs/s27/chain.times
.venv/bin/python eval/quality.py --steps 600 --out runs/s27 > runs/s27/bench2.log 2>&1
date -u +"cranhot start %T" >> runs/s27/chain.times
.venv/bin/python runs/s27/cranhot.py runs/s27/sparse > runs/s27/cranhot.log 2>&1
date -u +"end2 %T" >> runs/s27/chain.times
