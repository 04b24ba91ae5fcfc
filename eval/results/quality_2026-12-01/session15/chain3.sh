#!/bin/bash
cd /work/main
while pgrep -f chain2.sh > /dev/null; do sleep 10; done
date
.venv/bin/python benchmarks/health.py --run runs/s15/dft_frozen > runs/s15/dft_frozen_health.log 2>&1
date
