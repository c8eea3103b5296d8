"""User-facing errors.

Every error a user can cause is a :class:`MoeAuditError` whose message is one line that names the fix.
The CLI prints that line and exits non-zero without a traceback; library users catch the subclasses.
"""

from __future__ import annotations


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type's name when the message is empty): what a one-line
    error quotes of an error from a library."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class MoeAuditError(Exception):
    """Base class: an error the user can fix; ``str(err)`` is one line that says how."""

    exit_code: int = 2


class ModelLoadError(MoeAuditError):
    """The model could not be found, reached, or read."""


class UnsupportedModelError(MoeAuditError):
    """The model is dense, of an unsupported MoE family, or needs ``trust_remote_code``."""


class ContractError(MoeAuditError):
    """The installed transformers does not behave as the adapter was written for."""


class InvalidParameterError(MoeAuditError, ValueError):
    """A parameter is out of its allowed range (a layer index, a ratio, a kind)."""


class CorpusError(MoeAuditError):
    """The corpus could not be read or is unusable."""


class RunDirectoryError(MoeAuditError):
    """The run directory is missing, unwritable, or belongs to another configuration."""


class NonFiniteError(MoeAuditError):
    """The model produced NaN or inf activations (reported with the layer and position)."""


class HubUploadError(MoeAuditError):
    """An upload to the Hugging Face hub failed (no token, no write access, no network); what was to be
    uploaded stays on disk."""


class RunInterrupted(MoeAuditError):
    """A stage was interrupted (SIGINT / SIGTERM); its finished work units are kept for a resume."""

    exit_code = 130


def invalid(name: str, allowed: str, got: object, context: str = "") -> InvalidParameterError:
    """Build the house message: "`layer` must be in [0, 15] for X; got 16."."""
    where = f" for {context}" if context else ""
    return InvalidParameterError(f"`{name}` must be {allowed}{where}; got {got!r}.")
