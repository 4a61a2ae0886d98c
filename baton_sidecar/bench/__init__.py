"""Benchmarks: Baton's engine against run-to-completion and transformers baselines.

``cli.add_bench_arguments`` / ``cli.run_bench`` are the command-line entry points; the
modules are usable alone: ``workloads`` (requests and arrivals), ``systems`` (what runs
them), ``metrics`` (percentiles, goodput), ``ceiling`` (bare-forward limits), ``report``.
"""
