"""scanside: engines."""
