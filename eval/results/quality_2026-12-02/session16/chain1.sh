#!/bin/bash
# Stage 2 with dense-ft's own setting (dense InfoNCE at full weight, batches from one source), 150 steps.
cd /work/main
date
.venv/bin/python -m saejax.train --config configs/quality.py:sparse --config.loss.w_dense_contrastive=1.0 --config.data.batch_by_source=True --workdir runs/s16/sd1 > runs/s16/sd1.log 2>&1
date
.venv/bin/python eval/suites.py quality --model sd1=runs/s16/sd1 --baselines=none --no-plots --quiet --out runs/s16/sd1_eval > runs/s16/sd1_eval.log 2>&1
date
# The same with FLOPS reaching the SAE only.
.venv/bin/python -m saejax.train --config configs/quality.py:sparse --config.loss.w_dense_contrastive=1.0 --config.data.batch_by_source=True --config.loss.flops_to_encoder=False --workdir runs/s16/sd1nf > runs/s16/sd1nf.log 2>&1
date
.venv/bin/python eval/suites.py quality --model sd1nf=runs/s16/sd1nf --baselines=none --no-plots --quiet --out runs/s16/sd1nf_eval > runs/s16/sd1nf_eval.log 2>&1
date
