"""Layer 4, daemon: state (SQLite store, typed events, exam read model, retention)."""
