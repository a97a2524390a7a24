"""Layer 4, daemon: analysis (image models on completed series, shadow mode, adaptation)."""
