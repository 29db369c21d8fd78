"""The platform layer: process control, service managers (systemd, Windows service)."""
