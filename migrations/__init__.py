"""Alembic migrations: the only source of the database schema (installed with the package)."""
