"""Running a training stage: the loop, checkpoints, ranks, threads, memory, metrics, the
learning-rate schedule, held-out evaluation and the run directory."""
