"""Every error promptdml raises for bad input, in one hierarchy.

:class:`PromptDMLError` is the base of all user errors: the message names the file, folder, key or value at
fault and says what to do. The command line catches it and prints one ``error: ...`` message (exit code 2;
``--debug`` shows the traceback). Each subclass also derives from the built-in type it replaced
(``ValueError`` / ``RuntimeError``), so existing ``except ValueError`` code keeps working.
"""

from __future__ import annotations

__all__ = ["PromptDMLError", "ConfigError", "DataError", "BackboneError", "TrainingError", "DistributedError",
           "MergeError", "RetrievalError", "CorruptFileError", "WriteError", "RunDirError"]


class PromptDMLError(Exception):
    """A user error; the message says what is wrong and how to fix it."""


class ConfigError(PromptDMLError, ValueError):
    """A configuration file, override or command-line value is invalid."""


class DataError(PromptDMLError, ValueError):
    """A dataset is missing or malformed; the message names the file/folder and says how to fix it."""


class BackboneError(PromptDMLError, RuntimeError):
    """The backbone could not be built or its weights could not be loaded."""


class TrainingError(PromptDMLError, RuntimeError):
    """Training cannot start or continue; the message says why and what to change."""


class TrainingInterrupted(TrainingError):
    """Training stopped on SIGINT/SIGTERM after finishing a step; the resume state was saved."""


class RunDirError(TrainingError):
    """A run directory cannot be used: it holds another run, another process writes to it, or it is unwritable."""


class DistributedError(PromptDMLError, RuntimeError):
    """The distributed setup is inconsistent (the message says what to change)."""


class MergeError(PromptDMLError, RuntimeError):
    """The requested weights cannot be folded into the backbone."""


class RetrievalError(PromptDMLError, ValueError):
    """Bad input to embed / index / search / export."""


class CorruptFileError(PromptDMLError, ValueError):
    """A file promptdml wrote or reads (checkpoint, resume state, weights, index, embeddings) is empty,
    truncated or not of the expected kind; the message names the file."""


class WriteError(PromptDMLError, OSError):
    """A file could not be written; the message names the file and the reason (read-only, disk full, ...)."""
