"""What tests check in a run's console (stdout + stderr of ``ray-dpo train``): a test helper, not part of the package (pytest puts tests/, the directory of tests/conftest.py, on sys.path)."""

from __future__ import annotations

from ray_dpo.console import is_own_line

# Ray's chatter that must stay in its logs: the PlacementGroupCleaner's state-API warning
# (once a second without a dashboard) and Ray Train's per-step report dict with pair ids.
NOISE = ("PlacementGroupCleaner", "Failed to query Ray Train Controller", "Reporting training result",
         "pair_ids")


def console_problems(text: str, *, steps: int) -> list[str]:
    """Why ``text`` is not a clean console of a run of ``steps`` steps; empty if it is."""
    problems = [f"noise {marker!r}: {line[:200]}" for line in text.splitlines()
                for marker in NOISE if marker in line]
    own = [line.strip() for line in text.splitlines() if is_own_line(line)]
    for step in (1, steps):
        if not any(line.startswith(f"[ray_dpo] step {step}/{steps} ") for line in own):
            problems.append(f"no progress line for step {step}/{steps}")
    if not any(line.startswith(f"[ray_dpo] done: {steps} steps") for line in own):
        problems.append("no final summary")
    return problems


def foreign_lines(text: str) -> list[str]:
    """Non-empty lines that are not ray_dpo's."""
    return [line for line in text.splitlines() if line.strip() and not is_own_line(line)]
