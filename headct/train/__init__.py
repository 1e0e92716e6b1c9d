"""The training engine: schedules, checkpoints and the one training loop (imports torch)."""
