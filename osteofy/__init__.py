"""Osteofy Edge: explainable osteoporosis screening on the X-ray device.

A screening aid, not a diagnosis: every result must be confirmed with DXA.
"""

__version__ = "0.2.0"
