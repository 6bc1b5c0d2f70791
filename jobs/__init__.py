"""Entry points (`python -m jobs.X`): demo, convert, generate, collect_traces, bench_storage, bench_runtime,
train_tiny_moe, make_checkpoint; and the committed embedded model (`jobs/embedded_model/`).

Jobs may import everything below them (cluster/, actors/, policies/, storage_adapters/); nothing imports jobs/.
"""
