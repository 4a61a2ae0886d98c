"""Benchmarks: Baton's engine against run-to-completion and transformers baselines.

``cli.add_bench_arguments`` / ``cli.run_bench`` are the command-line entry points: the CLI
checks the arguments, a plan module (``plans.compare``, ``plans.priority``, ``plans.padding``)
turns the options it needs into a ``runner.Plan``, ``runner.Runner`` runs it, ``floors`` (a
table) judges the result, ``report`` writes it. The modules are usable alone: ``workloads``
(requests and arrivals), ``inputs`` (the workload the options ask for), ``systems`` (what runs
them), ``metrics`` (percentiles, goodput), ``ceiling`` (bare-forward limits), ``readme``.
"""
