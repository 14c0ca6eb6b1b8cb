"""One trial: the Ray Tune trainable, the trial table and the trial report."""
