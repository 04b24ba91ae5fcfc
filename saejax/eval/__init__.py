"""Retrieval evaluation: the harness (saejax models and baselines on BEIR folders), its report,
the ``python -m saejax.eval`` CLI, and an adapter for the `mteb` package.

    from saejax.eval import harness, report
    results = harness.evaluate(systems, specs, harness.HarnessConfig())
    report.write(results, "eval_out")

`saejax.eval.mteb_adapter` is imported on its own (it needs the optional `mteb` package).
"""
