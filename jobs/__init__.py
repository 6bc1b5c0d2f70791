"""Entry points (`python -m jobs.X`): convert, demo, bench_storage, and later batch_infer, serve_app, simulate.

Jobs may import everything below them (cluster/, actors/, policies/, storage_adapters/); nothing imports jobs/.
"""
