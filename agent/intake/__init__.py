"""Layer 4, daemon: intake (export-folder watch, ingest, C-STORE receiver, quarantine, pipeline)."""
