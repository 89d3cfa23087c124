"""criu-supervisor: a PID-1 supervisor that checkpoints its app with CRIU into a
shared volume on SIGTERM (or a spot notice) and restores it in the replacement
container."""

__version__ = "0.1.0"
