"""Decisions without Ray: eviction orders and byte budgets (and, later, predictors and ranking).

Pure Python/numpy/torch, importable by the simulator and tested in milliseconds. Imports nothing from this
project but `storage_adapters/` types, and never Ray.
"""
