"""tuneforge data plane: Celery training workers and the serving engine (torch lives here, never in app/)."""
