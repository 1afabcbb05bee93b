"""The `kerasfleet` command (click): predict, export, tune, profile, info. The top layer."""

from .main import main

__all__ = ["main"]
