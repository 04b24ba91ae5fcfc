#!/bin/bash
cd /work/main
while kill -0 1717 2>/dev/null; do sleep 20; done
date; echo sparse done
.venv/bin/python eval/quality.py --out runs/quality_s10 > runs/quality_s10.log 2>&1
date; echo quality done
.venv/bin/python benchmarks/health.py --run runs/quality_s10/sparse --run runs/quality_s10/frozen > runs/quality_s10_health.log 2>&1
date; echo health done
