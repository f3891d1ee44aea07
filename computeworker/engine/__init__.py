"""The worker's continuous-batching engine: requests, scheduling, sampling, stop strings."""
