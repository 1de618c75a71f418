"""Typed name registries: components are looked up by name, never by if/elif chains."""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from leakkit.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named collection of components of one kind, each with a one-line description.

    Args:
        kind: what the entries are ("objective", "optimizer", ...), used in error messages.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._descriptions: dict[str, str] = {}

    def register(self, name: str, *, description: str | None = None) -> Callable[[T], T]:
        """Decorator that adds an entry; the description defaults to the first docstring line."""

        def add(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            doc = description or (getattr(entry, "__doc__", None) or "").strip().splitlines()
            self._entries[name] = entry
            self._descriptions[name] = doc if isinstance(doc, str) else (doc[0] if doc else "")
            return entry

        return add

    def get(self, name: str) -> T:
        """Return the entry called `name`, or raise a ConfigError listing the valid names."""
        try:
            return self._entries[name]
        except KeyError:
            raise ConfigError(
                f"unknown {self.kind} {name!r}; valid: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def describe(self) -> list[tuple[str, str]]:
        """(name, one-line description) for every entry, sorted by name."""
        return [(n, self._descriptions[n]) for n in self.names()]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
