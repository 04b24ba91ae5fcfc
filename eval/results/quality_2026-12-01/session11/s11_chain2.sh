#!/bin/bash
# By-source refit: the config run's final encoder, a fresh head trained as stage 1 with every head batch from one source.
cd /work/main
while ! grep -q "health done" runs/exp/s11_chain.log; do sleep 30; done
date; echo chain1 done
.venv/bin/python -m saejax.hub.export --ckpt runs/quality_s10/sparse --backbone-only --out runs/exp/s11_backbone --force
.venv/bin/python -m saejax.train --config configs/quality.py:frozen,1 --config.model.init_from=runs/exp/s11_backbone --config.data.batch_by_source=True --workdir runs/exp/s11_refit_bysrc > runs/exp/s11_refit_bysrc.log 2>&1
date; echo trained
.venv/bin/python eval/suites.py quality --model refit-bysrc=runs/exp/s11_refit_bysrc --baselines=none --no-plots --quiet --out runs/exp/s11_refit_bysrc_eval > runs/exp/s11_refit_bysrc_eval.log 2>&1
date; echo evaluated
.venv/bin/python benchmarks/health.py --run runs/exp/s11_refit_bysrc > runs/exp/s11_refit_bysrc_health.log 2>&1
date; echo health done
