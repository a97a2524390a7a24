"""scanside: converters."""
