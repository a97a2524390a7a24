"""Layer 3, runtime: what every part of the daemon is built on: its settings (config), write health, the
component lifecycle and the memory release. Imports nothing of the project."""
