"""Simulation launcher and benchmark harnesses (nothing imports them)."""
