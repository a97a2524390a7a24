"""scanside: simulator."""
