"""Metric providers feeding rollout analysis (Prometheus)."""
