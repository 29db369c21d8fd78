"""The daemon's parts: one node of a crowd (see docs/architecture.md)."""
