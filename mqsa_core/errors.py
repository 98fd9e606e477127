"""The one base class of the errors a user can fix: every command prints its message and exits 2.

Each layer raises its own subclass (``ConfigError``, ``DataError``, ``PrepareError``,
``CheckpointError``, ``ExportError``...), so a message always names what is wrong and where,
and no command shows a traceback for a bad setting, a bad file or a missing input.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input, a bad setting or a missing/damaged file: the message says which and how to
    fix it. Commands catch this class, print ``error: <message>`` and exit with status 2."""


class ConfigError(UserError):
    """A configuration file or override is wrong; the message names the key, the value, the rule
    and the file or override it came from."""


class StorageError(UserError):
    """A URL cannot be opened, read or written (missing backend, permission, disk full), or a
    directory we did not create would have to be deleted."""


class CheckpointError(UserError):
    """A checkpoint is missing, unfinished, damaged, refused by the safe loader, or does not match
    the run's config or data."""


def first_line(error: BaseException) -> str:
    """The first line of ``error``'s message (its type's name when it has none): a third-party
    message inside one of ours stays one line."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
