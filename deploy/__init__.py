"""Deployment tooling: the bash scripts beside this file and the loopback harness.

Nothing in ``core``, ``clients`` or ``server`` imports this package
(docs/architecture.md#layers).
"""
