"""``baton-sidecar serve | bench | simulate``: the command line."""

from __future__ import annotations

import argparse
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    from .bench.cli import add_bench_arguments
    from .server.serve import add_serve_arguments
    from .simulate.cli import add_simulate_arguments

    parser = argparse.ArgumentParser(prog="baton-sidecar", description=__doc__)
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    commands = parser.add_subparsers(dest="command", required=True)
    add_serve_arguments(commands.add_parser(
        "serve", help="serve the engine over an OpenAI-compatible HTTP API (with the A/B router)"))
    add_bench_arguments(commands.add_parser(
        "bench", help="compare this engine with run-to-completion and transformers baselines"))
    add_simulate_arguments(commands.add_parser(
        "simulate", help="what-if: the engine's scheduler on simulated time, over replicas (capacity planning)"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "serve":
        from .server.serve import run_serve

        return run_serve(args)
    if args.command == "simulate":
        from .simulate.cli import run_simulate

        return run_simulate(args)
    from .bench.cli import run_bench

    return run_bench(args)


if __name__ == "__main__":
    sys.exit(main())
