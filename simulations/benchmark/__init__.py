"""The benchmark harnesses: one module per benchmark, and their command line.

``python -m simulations.benchmark <subcommand>`` (:mod:`simulations.benchmark.cli`)
runs one benchmark, writes its JSON document under ``benchmarks/`` and its table into
``docs/<subcommand>-benchmark.md``. Each benchmark calls the same core functions, or
the same Flower apps, that the federation runs, so a figure measures what a
deployment would do. :mod:`simulations.benchmark.output` is what every benchmark
leaves behind; :mod:`simulations.benchmark.security` is the adversarial
coordinator's benchmark, in a package of its own.
"""
