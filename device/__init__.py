"""Malaria Detect device package: what runs on the Raspberry Pi.

Nothing here imports TensorFlow; importing the package has no side effects.
"""

__version__ = "0.1.0"
