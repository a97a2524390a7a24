"""scanside: agent."""
