"""One small registry type for every family of names a config may choose from.

Losses, batch layouts, pair strategies, judges, weight-sync methods and generation engines
each keep a `Registry`: a name -> entry table whose entries carry the facts the rest of the
code asks about (a loss's `needs_reference`, a pair strategy's `needs_chosen`, ...), so no
code tests names as strings, and the config accepts whatever is registered.

    LOSSES = Registry("loss type", plural="names")
    LOSSES.add("sigmoid", spec)          # ValueError if the name is taken
    LOSSES.get("sigmod")                 # UnknownName: ... (did you mean 'sigmoid'?); valid names: ...
    LOSSES.names()                       # sorted names
    LOSSES.names(needs_reference=False)  # sorted names of the entries with these facts
    LOSSES.remove("sigmoid")             # e.g. a test's own entry
    "sigmoid" in LOSSES, LOSSES["sigmoid"], list(LOSSES)  # iteration: registration order

Pure: no third-party imports.
"""

from __future__ import annotations

import difflib
from typing import Any, Generic, Iterator, Mapping, Optional, TypeVar

T = TypeVar("T")


class UnknownName(ValueError):
    """A name that is not in a registry; the message lists the valid names."""


class Registry(Generic[T]):
    """Named entries of one kind, in registration order.

    what: what an entry is, for messages ("loss type", "batch layout").
    key: the config key that names an entry, put in front of the unknown-name message.
    plural: word after "valid" in that message ("names" -> "valid names: a, b").
    """

    def __init__(self, what: str, entries: Optional[Mapping[str, T]] = None, *, key: str = "",
                 plural: str = ""):
        self.what = what
        self.key = key
        self.plural = plural
        self._entries: dict[str, T] = {}
        for name, entry in (entries or {}).items():
            self.add(name, entry)

    def add(self, name: str, entry: T) -> T:
        """Register ``entry`` under ``name``; ValueError if the name is taken."""
        if name in self._entries:
            raise ValueError(f"{self.what} {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def remove(self, name: str) -> T:
        """Unregister ``name`` and return its entry."""
        self.get(name)
        return self._entries.pop(name)

    def get(self, name: str) -> T:
        """The entry of ``name``; UnknownName (a ValueError) naming the closest and the valid names."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise UnknownName(self.unknown_message(name)) from None

    def unknown_message(self, name: Any) -> str:
        close = difflib.get_close_matches(str(name), list(self._entries), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        valid = f"valid {self.plural}" if self.plural else "valid"
        prefix = f"{self.key}: " if self.key else ""
        return f"{prefix}unknown {self.what} {name!r}{hint}; {valid}: {', '.join(self.names())}"

    def names(self, **facts: Any) -> list[str]:
        """Sorted names; with ``facts``, only the entries whose attributes equal them."""
        return sorted(name for name, entry in self._entries.items()
                      if all(getattr(entry, fact) == value for fact, value in facts.items()))

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        try:
            return name in self._entries
        except TypeError:  # an unhashable value (a list from YAML) names nothing
            return False

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.what!r}: {', '.join(self._entries)})"
