"""Registered torch.library ops (one per kernel family)."""
