"""The training core: a pure library (no database, Celery or HTTP) that a job task calls."""
