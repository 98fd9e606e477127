"""Worker for tests/test_divergence.py: ``mqsa-ted train``'s entry point with the run's CPU
kernel replaced by one whose softmax transpose holds a NaN (the effect of the Intel Xeon
failure: the table's gradient goes NaN, the loss stays finite), so training must stop with one
line that names the step, the part, the path and the switch that helps.

    python -m mqsa_ted.torchrun ... tests/diverge_worker.py CONFIG [key=value ...]
"""

import sys

import trainer.runtime.builder as builder
from trainer.model.cpu_kernels import CpuKernel
from trainer.train import main


class NaNInTheTranspose(CpuKernel):
    def log_partition_block(self, q, items, paired, probs_t, lse, expected) -> None:
        super().log_partition_block(q, items, paired, probs_t, lse, expected)
        probs_t[0, 0] = float("nan")


def spoiled_kernel(cfg, env):
    kernel = LOAD(cfg, env)
    return None if kernel is None else NaNInTheTranspose(kernel.module)


LOAD, builder.load_cpu_kernel = builder.load_cpu_kernel, spoiled_kernel

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
