"""tuneforge control plane: datasets, adapter repos and versions, jobs and deployments over HTTP."""
