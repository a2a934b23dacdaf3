"""Data-plane tests: real Triton, nginx and Prometheus processes driven by the rollout engine."""
