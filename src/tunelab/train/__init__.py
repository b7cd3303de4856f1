"""Training: the loop (loop.py) and its components (loss, schedule, checkpoints, run directory)."""
