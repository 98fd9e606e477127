"""Runtime: building a run (``builder``), the DeepSpeed engine, the training loop (``Trainer``),
checkpoints, warm start, the process group, interruption, the run directory and tracking."""
