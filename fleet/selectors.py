"""Which devices a fleet command is about: ``site=lyon,class=jetson-orin``, ``cam-1,cam-2`` or ``all``.

A selector is a comma-separated list of terms. ``KEY=VALUE`` terms are labels, and a device must have
every one of them (``group=cams`` also matches a device whose ``group`` label lists ``cams`` among
others). Bare terms are device ids or group names, and a device must match at least one of them when
there are any. ``all`` (or ``*``) selects every device. Mixed selectors narrow: ``site=lyon,cam-1,cam-2``
is cam-1 and cam-2 if they are in Lyon.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from edgepack.errors import ConfigError
from edgepack.protocol import NAME_RE


@dataclass(frozen=True)
class Selector:
    text: str
    labels: tuple[tuple[str, str], ...] = ()
    names: frozenset[str] = frozenset()
    everything: bool = False

    @classmethod
    def parse(cls, text: str) -> Selector:
        terms = [t.strip() for t in text.split(",") if t.strip()]
        if not terms:
            raise ConfigError("an empty selector selects nothing; give KEY=VALUE labels, device ids, or 'all'")
        if terms in (["all"], ["*"]):
            return cls(text, everything=True)
        labels, names = [], set()
        for term in terms:
            key, sep, value = term.partition("=")
            if sep:
                if not key or not value:
                    raise ConfigError(f"selector term {term!r} must be KEY=VALUE with both parts")
                labels.append((key, value))
            elif NAME_RE.match(term):
                names.add(term)
            else:
                raise ConfigError(f"selector term {term!r} is neither KEY=VALUE nor a device id or group name")
        return cls(text, tuple(labels), frozenset(names))

    def matches(self, device: str, labels: Mapping[str, str], groups: Iterable[str]) -> bool:
        if self.everything:
            return True
        groups = set(groups)
        for key, value in self.labels:
            listed = key == "group" and value in {g.strip() for g in labels.get("group", "").split(",")}
            if labels.get(key) != value and f"{key}={value}" not in groups and not listed:
                return False
        return not self.names or device in self.names or bool(self.names & groups)

    def __str__(self) -> str:
        return self.text
