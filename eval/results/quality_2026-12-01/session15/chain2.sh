#!/bin/bash
# dense-ft (600 steps) then a frozen-encoder SAE on it: the two-stage alternative to joint stage 2.
cd /work/main
while pgrep -f chain1.sh > /dev/null; do sleep 10; done
date
.venv/bin/python -m saejax.hub.export --ckpt runs/s15/dense600 --out runs/s15/dense600_hf --backbone-only > runs/s15/export.log 2>&1
date
.venv/bin/python -m saejax.train --config configs/quality.py:frozen --config.model.init_from=runs/s15/dense600_hf --workdir runs/s15/dft_frozen > runs/s15/dft_frozen.log 2>&1
date
.venv/bin/python eval/suites.py quality --model dft_frozen=runs/s15/dft_frozen --baselines=none --no-plots --quiet --out runs/s15/dft_frozen_eval > runs/s15/dft_frozen_eval.log 2>&1
date
