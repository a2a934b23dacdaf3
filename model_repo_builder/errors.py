"""Builder error types and the CLI exit codes they map to."""

from __future__ import annotations

from typing import Any

# Exit codes of `model-repo-builder` (also listed in the CLI --help epilog).
EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_USAGE = 2
EXIT_BAD_INPUT = 3
EXIT_PARITY = 4
EXIT_MISSING_RUNTIME = 5

EXIT_CODES_HELP = """exit codes:
  0  ok
  1  unexpected error (a bug: please report it with the log)
  2  usage error (bad flags or serving options)
  3  bad input (missing/corrupt/unsupported model, digest mismatch, no batch dimension, HTTP 404,
     a model that would run code it carries when loaded, ...)
  4  parity failure (optimized model disagrees with the source beyond tolerance)
  5  missing runtime (TensorRT, a GPU or the Triton binary is not available here)"""


class BuilderError(Exception):
    """Base class: a failure the user can act on; `hint` says what to do."""

    exit_code = EXIT_UNEXPECTED

    def __init__(self, message: str, hint: str = "", details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.details = details or {}  # machine-readable context for --json (e.g. the parity report)

    def __str__(self) -> str:
        return f"{self.message} -- {self.hint}" if self.hint else self.message


class UsageError(BuilderError):
    exit_code = EXIT_USAGE


class BadInputError(BuilderError):
    exit_code = EXIT_BAD_INPUT


class UnsafeModelError(BadInputError):
    """The model would run code it carries when loaded (a pickle, a Keras Lambda layer, a custom op)."""


class ParityError(BuilderError):
    exit_code = EXIT_PARITY


class MissingRuntimeError(BuilderError):
    exit_code = EXIT_MISSING_RUNTIME


class ConfigError(ValueError):
    """Invalid serving options or Triton model configuration (maps to exit code 2)."""

    exit_code = EXIT_USAGE
