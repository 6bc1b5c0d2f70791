"""Entry points (`python -m jobs.X`): demo, convert, generate, batch_infer, serve_app (Ray Serve), load_test, soak,
benchmark (policies on a trace through the real cluster), simulate, report, collect_traces, train_predictor,
eval_predictors, hash_api_key, bench_storage, bench_runtime, bench_coordinator, bench_load_cpu, bench_hbm,
train_tiny_moe, make_checkpoint;
and the committed embedded model (`jobs/embedded_model/`).

Jobs may import everything below them (cluster/, actors/, policies/, storage_adapters/); nothing imports jobs/.
"""
