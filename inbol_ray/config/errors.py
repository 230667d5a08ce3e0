"""The config error type and the small range checks every section's `__post_init__` uses."""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad config: the message is one line naming the key, value or path."""


def at_least(key: str, value: int, low: int) -> None:
    if value < low:
        raise ConfigError(f"{key} must be >= {low}, got {value}")


def in_range(key: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ConfigError(f"{key} must be in [{low}, {high}], got {value}")
