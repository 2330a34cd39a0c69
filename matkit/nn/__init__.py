"""Shared neural-network building blocks (radial bases, envelopes, equivariant operations)."""
