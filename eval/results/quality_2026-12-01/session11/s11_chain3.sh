#!/bin/bash
# Refit on more pairs: the config run's final encoder, a fresh head on 16,384 pairs for 600 steps of 1,024 (same epochs).
cd /work/main
while ! grep -q "rc=" /tmp/suite.log; do sleep 15; done
date; echo suite done
.venv/bin/python -m saejax.train --config configs/quality.py:frozen,1 --config.model.init_from=runs/exp/s11_backbone --config.warmstart.pairs=16384 --config.warmstart.steps=600 --workdir runs/exp/s11_refit_16k > runs/exp/s11_refit_16k.log 2>&1
date; echo trained
.venv/bin/python eval/suites.py quality --model refit-16k=runs/exp/s11_refit_16k --baselines=none --no-plots --quiet --out runs/exp/s11_refit_16k_eval > runs/exp/s11_refit_16k_eval.log 2>&1
date; echo evaluated
.venv/bin/python benchmarks/health.py --run runs/exp/s11_refit_16k > runs/exp/s11_refit_16k_health.log 2>&1
date; echo health done
