"""Runs inside each worker kernel (ipykernel): takes calls from the server over one comm
and runs the user's functions. Never imports `server`.

The server bootstraps a fresh kernel with `wire.BOOTSTRAP`, which calls `register`."""

from .runtime import register

__all__ = ["register"]
