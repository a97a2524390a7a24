"""Layer 2, inference: the model wrappers (sequence label, csPCa, gland and zones, input range)."""
