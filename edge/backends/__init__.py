"""Inference backends. Each imports its heavy library only when constructed."""
