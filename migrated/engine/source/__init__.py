"""The source side of a migration: precopy → switchover → postcopy → recovery."""

from .engine import SourceEngine

__all__ = ["SourceEngine"]
