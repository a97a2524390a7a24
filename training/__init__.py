"""scanside: training."""
