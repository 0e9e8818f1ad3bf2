"""dcx: turn machines anywhere into one cluster."""

__version__ = "0.1.0"
