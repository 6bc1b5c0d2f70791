"""Decisions without Ray: eviction orders and byte budgets (DRAM tier LRU, HBM cache index), expert placement,
routing traces, the predictors behind one interface (`registry.py`: history, seed strategies, next-gate
speculation, learned/pre-gated, request-level, ensemble), the runtime's batched next-layer speculator
(`fast_path.py`), the prefetch planner (`ranking.py`; its ranking compiled with numba, `rank_kernel.py`) and the
reuse estimate it values residents by (`reuse.py`), the per-miss cost model, prefetch telemetry, and the
discrete-event simulator with its hardware/model profiles.

Pure Python/numpy/torch (numba for the planner's kernel), importable by the simulator and tested in milliseconds.
Imports nothing from this project but `storage_adapters/` types, and never Ray.
"""
