"""The data pipeline's exception type and error-message helper."""

from __future__ import annotations

from typing import Any

from py4j.protocol import Py4JError

from mqsa_core.errors import UserError

MAX_CAUSES = 64  # guard against a cause chain that loops
WRAPPERS = {"RuntimeException", "SparkException", "Exception", "ExecutionException"}


class PrepareError(UserError):
    """Bad input or output for the data pipeline; the message names the problem and the URL."""


def java_root(java: Any) -> str:
    """``ClassName: message`` of the last exception in a Java exception's cause chain (just the
    message when the class is a generic wrapper such as ``RuntimeException``)."""
    for _ in range(MAX_CAUSES):
        cause = java.getCause()
        if cause is None:
            break
        java = cause
    name = str(java.getClass().getSimpleName())
    message = java.getMessage()
    if not message:
        return name
    return str(message) if name in WRAPPERS else f"{name}: {message}"


def root_cause(error: BaseException) -> str:
    """One line for a failure: the first line of its root cause's message.

    The Python chain (``__cause__``) is followed to its end; a JVM error there (py4j's
    ``java_exception``, PySpark's captured ``_origin``) is followed down its Java cause chain,
    so "Job aborted ... Exception thrown in awaitResult:" becomes the error that caused it
    (e.g. "file:/x.parquet is not a Parquet file ...").
    """
    for _ in range(MAX_CAUSES):
        if error.__cause__ is None:
            break
        error = error.__cause__
    java = getattr(error, "java_exception", None) or getattr(error, "_origin", None)
    text = str(error)
    if java is not None:
        try:
            text = java_root(java)
        except Py4JError:
            pass  # the JVM is gone: keep the Python-side message
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__
