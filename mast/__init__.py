"""MAST: mechanism-aligned selective targeting for unlearning RLVR capabilities."""

__version__ = "0.1.0"
