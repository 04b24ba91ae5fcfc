set -e
cd /work/main
.venv/bin/python -m saejax.hub.export --ckpt runs/exp/s2lowlr --backbone-only --out runs/exp/s2lowlr_backbone --force
.venv/bin/python -m saejax.train --config configs/quality.py:frozen,1 --config.model.init_from=runs/exp/s2lowlr_backbone --config.warmstart.batch_size=1024 --config.warmstart.steps=300 --workdir runs/exp/s2refit
.venv/bin/python -m saejax.eval --model s2refit=runs/exp/s2refit --beir=scifact=/work/shared/data/scifact:test --beir=cranfield=/work/shared/data/cranfield:test --beir=debian=/work/shared/data/debian-descriptions/beir-dev:dev --beir=scifact-unseen=/work/shared/data/scifact:test~train --baselines none --k-sweep=8,16,32,64,128 --k-query-sweep=64,128,256,512 --max-doc-len=128 --no-plots --quiet --out runs/exp/s2refit_eval
.venv/bin/python benchmarks/health.py --run runs/exp/s2refit 2>&1 | grep "^|"
