"""The thin tuneforge client: Predibase-shaped calls over HTTP (httpx + pydantic only)."""
