"""What a config check reports: one Problem per wrong key, all of them in one ConfigError.

Pure: no third-party imports.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a config: its dotted key and how to fix it."""

    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}"


class ConfigError(ValueError):
    """Every problem found in a config, each with its key path and how to fix it."""

    def __init__(self, problems: list[Problem], source: str = "config"):
        self.problems = list(problems)
        lines = [f"{source}: {len(self.problems)} problem(s):"]
        lines += [f"  - {p}" for p in self.problems]
        super().__init__("\n".join(lines))
