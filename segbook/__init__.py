"""A reproducible research book on ISTR and Mask Transfiner: read the derivations, run them, trust the numbers."""

__version__ = "0.1.0"
