#!/bin/bash
# Wait for the sparse arm to finish, stop the orchestrator before its dense arm reads code that a
# helper may be editing, and continue from a clean worktree at the commit the sparse arm ran.
cd /work/main
until [ -f runs/quality/sparse/summary.json ] && grep -q '"step": 600' runs/quality/sparse/summary.json; do sleep 5; done
sleep 2
pkill -f "eval/quality.py --out runs/quality"
pkill -f "quality.py:dense"
sleep 5
echo "handoff $(date -u)" >> runs/s39/quality.log
cd /work/s39wt
/usr/bin/time -v /work/main/.venv/bin/python eval/quality.py --out /work/main/runs/quality > /work/main/runs/s39/quality2.log 2> /work/main/runs/s39/quality2.time
