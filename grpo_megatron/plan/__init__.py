"""The true-size dry run: the per-GPU memory plan of a job, from one simulated rank per distinct position."""
