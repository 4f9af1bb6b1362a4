"""Task adapters: what differs between served models (decode or tokenise, run, answer, schema)."""
