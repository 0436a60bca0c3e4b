"""Speculative decoding: proposers of draft tokens (the engine verifies them, engine/speculation.py)."""
