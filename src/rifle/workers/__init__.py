"""Workers on a shared Optuna storage, for sweeps and campaigns alike: search spaces (space), storages with
heartbeats and retries (storage), the worker and its objective (worker), a sweep's MLflow tree (runs), and a
campaign's cells (cells)."""
