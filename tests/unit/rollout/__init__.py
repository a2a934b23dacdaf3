"""Unit tests of the rollout engine, routers and metric providers."""
