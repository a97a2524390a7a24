"""Layer 4, daemon: outputs (alerts, sinks, webhook, DICOM SR/SEG out and send, maps, redaction)."""
