"""One error vocabulary: every error the host raises for a user to read.

Each class is a subclass of :class:`SmtError` and carries the exit code the
``smt`` command ends with (:class:`ExitCode`, in the manner of pytest's):
2 for bad input (a spec, a plugin set, a data file, a command line), 1 for a
run that failed, 130 for an interrupt. The CLI has one handler: it prints
``error: <message>`` and exits with the error's code; ``SMT_DEBUG=1`` shows
the traceback too.

The classes also derive from the built-in exception a caller would expect
(``ValueError`` for bad values, ``RuntimeError`` for failures), so
``except ValueError`` keeps working.

Example:
    >>> from smt_host.errors import ConfigError, ExitCode
    >>> err = ConfigError(["must be >= 1, got 0 @ $.models.m.training.epochs"], "eco.toml")
    >>> str(err)
    'eco.toml: must be >= 1, got 0 @ $.models.m.training.epochs'
    >>> err.exit_code is ExitCode.USAGE_ERROR
    True
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Exit codes of the ``smt`` command."""

    #: the command did what it was asked
    OK = 0
    #: a run failed (a NaN loss, a worker that died...)
    FAILED = 1
    #: bad input: a spec, a plugin set, a data file, a lock, a command line
    USAGE_ERROR = 2
    #: interrupted (Ctrl-C)
    INTERRUPTED = 130


class SmtError(Exception):
    """Base of every host error; ``exit_code`` is what ``smt`` exits with."""

    exit_code: ExitCode = ExitCode.FAILED


class ConfigError(SmtError, ValueError):
    """A spec or technique parameter that does not validate.

    ``errors`` is a list of ``"message @ $.path"`` strings; ``source`` names
    the file when there is one.
    """

    exit_code = ExitCode.USAGE_ERROR

    def __init__(self, errors: list[str], source: str | None = None) -> None:
        self.errors = list(errors)
        self.source = source
        prefix = f"{source}: " if source else ""
        if len(self.errors) == 1:
            text = prefix + self.errors[0]
        else:
            text = prefix + f"{len(self.errors)} errors:\n" + "\n".join(f"  {e}" for e in self.errors)
        super().__init__(text)


class FieldValueError(SmtError, ValueError):
    """Raised by validators; carries the field name so the path can name it."""

    exit_code = ExitCode.USAGE_ERROR

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{message} @ .{field}")


class PluginError(SmtError, RuntimeError):
    """A plugin that cannot be used; the message names the distribution."""

    exit_code = ExitCode.USAGE_ERROR


class ManifestMismatch(PluginError):
    """The installed plugins differ from those a plan, checkpoint, export or
    lock was made with; the message names every difference."""


class CapacityError(SmtError, ValueError):
    """A budget that cannot be met; names the techniques that cost most."""

    exit_code = ExitCode.USAGE_ERROR


class DataFormatError(SmtError, ValueError):
    """A malformed row or file: ``"<file name>:<line>: <fault>"``.

    ``line`` is 1-based and counts the header (for Parquet it is the 1-based
    row number); ``line`` is 0 for faults of the file as a whole.
    """

    exit_code = ExitCode.USAGE_ERROR

    def __init__(self, file: str, line: int, fault: str) -> None:
        self.file = file
        self.line = line
        self.fault = fault
        super().__init__(f"{file}:{line}: {fault}")


class TrainingError(SmtError, RuntimeError):
    """Training cannot go on (NaN/inf loss, bad checkpoint...)."""

    exit_code = ExitCode.FAILED


class ExportError(SmtError, RuntimeError):
    """The run cannot be exported (no checkpoint, no spec...)."""

    exit_code = ExitCode.USAGE_ERROR


class LockError(SmtError, RuntimeError):
    """A lock file that cannot be honoured; names the technique and versions."""

    exit_code = ExitCode.USAGE_ERROR


class DamagedFileError(SmtError, ValueError):
    """A checkpoint, DCP folder or export whose bytes differ from the checksum
    recorded when it was written, or that cannot be read at all (truncated,
    empty); the message names the file and what is wrong with it."""

    exit_code = ExitCode.USAGE_ERROR


class UnsafeFileError(SmtError, ValueError):
    """A file that would run code if it were loaded (a pickled object, a
    global outside the allow-list, a program calling something that is not
    an operator); refused before anything in it runs, naming what it holds."""

    exit_code = ExitCode.USAGE_ERROR


class DeviceError(SmtError, ValueError):
    """A ``--device`` this machine or this torch build cannot train on."""

    exit_code = ExitCode.USAGE_ERROR


class ScaffoldError(SmtError, ValueError):
    """Bad input to the scaffold; the message says what to change."""

    exit_code = ExitCode.USAGE_ERROR
