"""Silence the third-party warnings we have read and understood, so a log shows our own lines.

Each entry names the warning, where it comes from and why it is safe to ignore. Every command's
entry (``mqsa_ted.cli``) calls :func:`install` before its heavy imports, in each process (the
ranks of ``mqsa-ted train`` run the same entry). pytest cannot use these filters (it resets them
per test), so ``[tool.pytest.ini_options] filterwarnings`` in pyproject.toml repeats the list.
"""

from __future__ import annotations

import logging
import warnings

# (category, start of the message as a regex, why we ignore it)
UNDERSTOOD_WARNINGS: list[tuple[type[Warning], str, str]] = [
    (
        FutureWarning,
        r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
        "raised inside TorchRec's sharding and DeepSpeed (not our calls), once per rank; "
        "the replacement does not exist in the versions they pin",
    ),
    (
        FutureWarning,
        r"Please use DTensor instead and we are deprecating ShardedTensor",
        "torch.distributed.checkpoint reading TorchRec's ShardedTensor state (checkpoints, "
        "export); TorchRec 1.8 still shards with ShardedTensor",
    ),
    (
        DeprecationWarning,
        r"(?s).*Failed to import: fbgemm_gpu\.split_embedding_codegen_lookup_invokers",
        "the CPU build of fbgemm-gpu lacks the GPU-only optimizers (SSD, Adam, LAMB...); "
        "we use rowwise Adagrad, Adagrad and SGD, which it has",
    ),
    (
        DeprecationWarning,
        r"(?s).*The Python module fbgemm_gpu\.split_table_batched_embeddings_ops is now",
        "TorchRec 1.8 imports fbgemm's deprecated module alias; nothing of ours does",
    ),
]

# (logger, why its warnings are silenced)
UNDERSTOOD_LOGGERS: list[tuple[str, str]] = [
    (
        "torch.fx._symbolic_trace",
        "'is_fx_tracing will return true for both fx.symbolic_trace and torch.export': "
        "logged once per rank when TorchRec's modules check for tracing; we never trace them",
    ),
]


def install() -> None:
    """Add the filters above to this process (idempotent)."""
    for category, message, _why in UNDERSTOOD_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, _why in UNDERSTOOD_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
