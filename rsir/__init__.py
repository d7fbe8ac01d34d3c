"""rsir: recursive self-improving sequential recommendation with fidelity control."""

__version__ = "0.1.0"
