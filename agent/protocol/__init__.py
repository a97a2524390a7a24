"""Layer 3, protocol: PI-RADS profiles, the checker (a function of series summaries), wording."""
