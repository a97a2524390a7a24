"""Layer 4, daemon: the service (daemon, API, metrics, health, systemd, configuration)."""
