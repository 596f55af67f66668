"""Rules both planes and the client share: adapter references, artifact files, speculator configs,
dataset kinds and splits, and the per-step metric fields. Pure: stdlib and pydantic only."""
