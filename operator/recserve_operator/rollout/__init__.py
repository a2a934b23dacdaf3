"""Rollout engine: policies, state, the pure canary/A-B state machine, analysis and statistics."""
