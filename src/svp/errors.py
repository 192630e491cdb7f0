"""The errors a user can cause, in one hierarchy.

Everything a user can get wrong (a config key, a dataset on disk, a checkpoint, an
adapter directory, a run folder to resume, a scan backend that cannot run here, ...)
raises a subclass of :class:`SVPError` whose message names the file, key or value and
what was expected. ``svp.cli.main`` turns any of them into one line on stderr and exit
code 2; anything else is a bug and keeps its traceback.

The subclasses also derive from the builtin each one used to be (``ValueError``,
``RuntimeError``, ...) so that ``except ValueError`` in user code keeps working.
"""
from __future__ import annotations

EXIT_USER_ERROR = 2


class SVPError(Exception):
    """Base class of every error a user can cause; ``exit_code`` is what the CLI returns."""

    exit_code = EXIT_USER_ERROR


class ConfigError(SVPError, ValueError):
    """A configuration file, override or command-line value is invalid."""


class OutputError(ConfigError):
    """A run folder or output file cannot be written (full disk, read-only, removed): what runs
    after it in the same place would fail the same way, so a demo stops there."""


class DatasetError(SVPError):
    """A dataset on disk is missing, malformed or unreadable."""


class CheckpointError(SVPError, RuntimeError):
    """A backbone checkpoint cannot be read or does not fit the model."""


class AdapterError(SVPError, ValueError):
    """An adapter directory is missing, corrupt, or belongs to other base weights."""


class ResumeError(SVPError, RuntimeError):
    """A run folder cannot be resumed (missing, corrupt, locked, incompatible override)."""


class BackendError(SVPError, RuntimeError):
    """A scan backend was asked for that cannot run here (missing package, device, dtype, shape)."""


class PeerError(SVPError):
    """Under torchrun: the main rank refused the run (its own message says why); the other
    ranks stop with this, and the same exit code, instead of a connection error."""

    def __init__(self, message: str, exit_code: int = EXIT_USER_ERROR):
        super().__init__(message)
        self.exit_code = exit_code


class VizError(SVPError, ValueError):
    """A visualisation input (image, mask, box, layer) is invalid."""


class OutOfMemoryIn(MemoryError):
    """Out of memory in a step svp can name (building a method's own tensors): the CLI prints
    its ``advice`` instead of the general one, which blamed the batch size (QA 16a)."""

    def __init__(self, message: str, advice: str):
        super().__init__(message)
        self.advice = advice


def first_line(e: BaseException) -> str:
    """The first line of an exception's text, or its type's name where it has none (torch's
    allocator errors run over several lines)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def out_of_memory(e: BaseException) -> bool:
    """Python's MemoryError, or a RuntimeError of torch's allocators (CPU and CUDA) or of a file
    mapped without memory left ("Cannot allocate memory"): the process's state, not the input's."""
    return isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and any(
        w in str(e) for w in ("allocate memory", "DefaultCPUAllocator", "CUDA out of memory")))
