"""``python -m simulations.benchmark <subcommand>`` (simulations/benchmark/cli.py)."""

from simulations.benchmark.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
