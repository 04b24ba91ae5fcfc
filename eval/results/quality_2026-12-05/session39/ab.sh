#!/bin/bash
# The sparse arm as trained by the commit before session 37's stage-1 pool fix (2afd26b), on this
# machine, evaluated by the current code with the benchmark's own sparse-group command.
cd /work/s39old
/usr/bin/time -v /work/main/.venv/bin/python -m saejax.train --config=/work/s39old/configs/quality.py:sparse,600 --workdir=/work/main/runs/s39/q_old/sparse > /work/main/runs/s39/q_old/train.log 2> /work/main/runs/s39/q_old/train.time
cd /work/main
/usr/bin/time -v .venv/bin/python -m saejax.eval --beir=scifact=/work/shared/data/scifact:test --beir=cranfield=/work/shared/data/cranfield:test --beir=debian=/work/shared/data/debian-descriptions/beir-dev:dev '--beir=scifact-unseen=/work/shared/data/scifact:test~train' --k-sweep=8,16,32,64,128 --k-query-sweep=64,128,256,512 --max-doc-len=128 --model=sparse=/work/main/runs/s39/q_old/sparse --encoder-of=sparse-encoder=/work/main/runs/s39/q_old/sparse --baselines=none --out=/work/main/runs/s39/q_old/eval > /work/main/runs/s39/q_old/eval.log 2> /work/main/runs/s39/q_old/eval.time
