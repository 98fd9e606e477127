"""``mqsa_ted.export``'s command under torchrun, with a collective timeout of 3 s and an index
build on rank 0 that takes 8 s: the export must not hold the other ranks in a collective while
rank 0 builds. Rank 0 writes the threads its build ran on to ``THREADS_FILE``.

Usage (under torchrun): python tests/slow_index_export_worker.py THREADS_FILE EXPORT_ARGS...
"""

import functools
import sys
import time
from pathlib import Path

import faiss
import torch

import mqsa_ted.export
from trainer.runtime.distributed import init_distributed

COLLECTIVE_TIMEOUT_S = 3
BUILD_S = 8


def slow_build(threads_file: Path, build):
    def build_slowly(vectors, kind):
        time.sleep(BUILD_S)
        threads_file.write_text(f"{torch.get_num_threads()} {faiss.omp_get_max_threads()}")
        return build(vectors, kind)

    return build_slowly


def main() -> int:
    threads_file, *argv = sys.argv[1:]
    mqsa_ted.export.init_distributed = functools.partial(
        init_distributed, timeout_s=COLLECTIVE_TIMEOUT_S
    )
    mqsa_ted.export.build_faiss = slow_build(Path(threads_file), mqsa_ted.export.build_faiss)
    return mqsa_ted.export.main(argv)


if __name__ == "__main__":
    sys.exit(main())
