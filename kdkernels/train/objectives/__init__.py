"""The training objectives (nn.Modules around the fused losses) and how a run's options
build them."""
