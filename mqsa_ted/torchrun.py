"""torchrun, ending in one line: ``python -m mqsa_ted.torchrun [torchrun's arguments]``.

``mqsa-ted train --nproc N`` and ``launch.sh`` start the ranks through this module rather than
``torch.distributed.run`` itself: a rank that fails has already printed its one ``error:`` line,
and torchrun's own report (a ``ChildFailedError`` traceback of ~40 lines that repeats it) is
left out. The exit status is the first failed rank's (128 + N for a rank killed by signal N, or
for torchrun itself stopped by signal N).
"""

from __future__ import annotations

import logging
import sys


def run_torchrun(argv: list[str]) -> int:
    """Run torchrun with ``argv``; 0, or the first failed rank's exit status."""
    import torch.distributed.elastic.agent.server.api  # noqa: F401  (its logger, made below)
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(argv)
    for name in list(logging.root.manager.loggerDict):  # each sets its own level on import
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        run(args)
    except ChildFailedError as e:
        code = e.get_first_failure()[1].exitcode
        return code if code > 0 else 128 - code
    except SignalException as e:  # SIGTERM / SIGINT to torchrun: it forwarded the signal, the
        return 128 + int(e.sigval)  # ranks checkpointed and said so in one line (or were killed)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(run_torchrun(sys.argv[1:]))
