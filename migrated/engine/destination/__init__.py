"""The destination side of a migration: accept → pages → restore → faults."""

from .engine import DestinationEngine

__all__ = ["DestinationEngine"]
