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
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(argv)
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(args)
    except ChildFailedError as e:
        code = e.get_first_failure()[1].exitcode
        return code if code > 0 else 128 - code
    except SignalException as e:  # SIGTERM / SIGINT to torchrun: it has stopped the ranks
        print(f"torchrun: stopped by {e.sigval.name}", file=sys.stderr)
        return 128 + int(e.sigval)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(run_torchrun(sys.argv[1:]))
