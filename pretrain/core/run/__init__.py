"""Run plumbing both stages share: the trainer, checkpoints and resume, guards against lost work,
logs, precision choice, LR schedules, curves, safe checkpoint loading, where the configs are."""
