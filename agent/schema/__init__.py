"""Layer 0, schema: the typed events and the sequence taxonomy every layer speaks (the stable event schema
vendors embed). Imports nothing of the project."""
