"""The data pipeline's exception type and error-message helper."""

from __future__ import annotations

from core.errors import UserError


class PrepareError(UserError):
    """Bad input or output for the data pipeline; the message names the problem and the URL."""


def first_line(error: BaseException) -> str:
    """The first line of an error's message; for a raw JVM error, of the Java exception's."""
    java = getattr(error, "java_exception", None)
    text = (str(java.toString()) if java is not None else str(error)).strip()
    return text.splitlines()[0] if text else type(error).__name__
