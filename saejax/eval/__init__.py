"""Retrieval evaluation: the harness (saejax models and baselines on BEIR folders), its report,
the ``python -m saejax.eval`` CLI, the table printed after training, and an adapter for the
`mteb` package.

    from saejax.eval import harness, report
    results = harness.evaluate(systems, specs, harness.HarnessConfig())
    report.write(results, "eval_out")

`quickeval` is the post-training evaluation (`saejax.train` calls it when ``config.eval.enabled``)
and holds the shared pieces the harness builds on (exact search, BM25, ir-measures).
`saejax.eval.mteb_adapter` is imported on its own (it needs the optional `mteb` package). Imports
`hub`, `retrieval`, `sae`, `data` and the core modules, never the trainer. The suites users run
(which BEIR sets, baselines and k) and their latest reports live in the repository's top-level
``eval/`` folder.
"""
