"""The project's logger: Python ``logging``, rank-aware, printing the lines the commands print.

    from mqsa_core.log import get_logger
    log = get_logger(__name__)
    log.info("resumed from ...")              # rank 0 only, to stdout
    log.warning("checkpoint ... is damaged")  # rank 0 only, to stderr as "warning: ..."
    log.info("...", extra=EVERY_RANK)         # every rank (a rank's own finding)

Records below WARNING go to stdout as the bare message, WARNING and above to stderr prefixed
``warning:`` / ``error:``, each line flushed at once (progress of long jobs reaches logs as it
happens). Only rank 0 speaks unless a record asks for every rank: its rank is the one
``set_rank`` was given (``trainer.runtime.distributed.init_distributed`` gives it), else the
launcher's (``mqsa_core.launch_env``). The handlers hang on the ``mqsa`` logger, which does not
propagate, so an application embedding the trainer can attach its own.
"""

from __future__ import annotations

import logging
import sys

ROOT = "mqsa"
EVERY_RANK = {"every_rank": True}
PREFIXES = {logging.WARNING: "warning: ", logging.ERROR: "error: ", logging.CRITICAL: "error: "}
_rank: int | None = None


def set_rank(rank: int) -> None:
    """This process's rank, for the rank-0 filter."""
    global _rank
    _rank = rank


def current_rank() -> int:
    if _rank is None:
        from mqsa_core.launch_env import launch_env

        return launch_env().rank
    return _rank


class _RankZero(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return bool(getattr(record, "every_rank", False)) or current_rank() == 0


class _Plain(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return PREFIXES.get(record.levelno, "") + record.getMessage()


class _Below(logging.Filter):
    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < self.level


class _CurrentStream(logging.StreamHandler):
    """A handler writing to ``sys.stdout`` or ``sys.stderr`` as they are at each record
    (pytest's capture and redirections replace them)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name_of_stream = name

    @property
    def stream(self):  # type: ignore[override]
        return getattr(sys, self.name_of_stream)

    @stream.setter
    def stream(self, value) -> None:  # logging.StreamHandler.__init__ assigns it
        pass


def _install() -> logging.Logger:
    root = logging.getLogger(ROOT)
    if root.handlers:
        return root
    out, err = _CurrentStream("stdout"), _CurrentStream("stderr")
    out.addFilter(_Below(logging.WARNING))
    err.setLevel(logging.WARNING)
    for handler in (out, err):
        handler.setFormatter(_Plain())
        handler.addFilter(_RankZero())
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    root.propagate = False
    return root


def get_logger(name: str) -> logging.Logger:
    """The logger of module ``name`` under the project's ``mqsa`` logger."""
    _install()
    return logging.getLogger(f"{ROOT}.{name}")
