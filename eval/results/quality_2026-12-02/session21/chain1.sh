#!/bin/bash
cd /work/main
date -u +"start %T" > runs/s21/chain1.times
.venv/bin/python eval/quality.py --steps 600 --out runs/quality600 > runs/s21/quality600.log 2>&1
date -u +"done %T rc=$?" >> runs/s21/chain1.times
