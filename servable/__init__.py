"""Servable core: configuration, shared pre-processing and the model artifact contract (no torch)."""
