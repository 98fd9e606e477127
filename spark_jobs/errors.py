"""The one exception type of the data pipeline."""

from __future__ import annotations


class PrepareError(RuntimeError):
    """Bad input or output for the data pipeline; the message names the problem and the URL."""
