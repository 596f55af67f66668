"""Domain logic: datasets, repos, adapter versions, auth (routes stay thin)."""
