"""Build verified, tuned Triton model repositories from exported recommendation models."""

__version__ = "0.1.0"
