"""Training and held-out batches as pure functions of (seed, step, micro-batch, rank): token
windows, masked prompt/completion streams, generated completions, teacher-cache sequences."""
