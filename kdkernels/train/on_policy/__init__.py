"""On-policy (GKD) and sequence-level KD: generated micro-batches, seeded sampling, and the
`--preset on-policy` comparison."""
