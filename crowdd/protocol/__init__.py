"""Typed messages, one module per protocol, used by both the producer and the consumer."""
