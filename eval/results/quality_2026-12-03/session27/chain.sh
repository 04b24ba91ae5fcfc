#!/bin/bash
# Session 27: the whole quality benchmark in one report, every system scored as saejax searches
# (idf 0.5). Arms reused as trained: sparse = runs/s24/sparse (configs/quality.py:sparse, 600) with
# its evaluation group, dense = runs/s26/dense (configs/quality.py:dense, 600); the frozen arm
# trained here from the sparse arm's stage-1 head; dense-ft, frozen and baselines evaluated here.
set -e
cd /work/main
date -u +"bench start %T" >> runs/s27/chain.times
.venv/bin/python eval/quality.py --steps 600 --out runs/s27 > runs/s27/bench.log 2>&1
date -u +"health start %T" >> runs/s27/chain.times
.venv/bin/python benchmarks/health.py --run runs/s27/sparse > runs/s27/health.log 2>&1
date -u +"end %T" >> runs/s27/chain.times
