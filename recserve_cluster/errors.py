"""Errors the cluster tooling reports to users as one clear message (never a traceback)."""


class ClusterError(RuntimeError):
    """A failure with a message that says what went wrong and what to do about it."""
