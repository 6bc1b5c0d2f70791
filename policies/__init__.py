"""Decisions without Ray: eviction orders and byte budgets (DRAM tier LRU, HBM cache index), expert placement,
and the trace-driven predictor work (traces, predictors, replay).

Pure Python/numpy/torch, importable by the simulator and tested in milliseconds. Imports nothing from this
project but `storage_adapters/` types, and never Ray.
"""
