"""vLLM as a serving engine behind tuneforge's HTTP app: its process, its requests, its metrics."""
