"""Which versions of a model to serve, as TF Serving's ``model_version_policy`` says it.

``latest`` (the newest version), ``latest:N`` (the N newest) or ``specific:1,3`` (exactly those).
The newest served version is the default: requests that name no version go to it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VersionPolicy:
    latest: int | None = 1  # serve the N newest versions; None: ``specific``
    specific: tuple[int, ...] = ()

    @classmethod
    def parse(cls, text: str) -> VersionPolicy:
        """``latest``, ``latest:N`` or ``specific:V[,V...]``; ``ValueError`` otherwise."""
        kind, _, arg = text.strip().partition(":")
        try:
            if kind == "latest":
                n = int(arg) if arg else 1
                if n < 1:
                    raise ValueError
                return cls(latest=n)
            if kind == "specific":
                versions = tuple(sorted({int(v) for v in arg.split(",") if v.strip()}))
                if not versions or min(versions) < 1:
                    raise ValueError
                return cls(latest=None, specific=versions)
        except ValueError:
            pass
        raise ValueError(
            f"version policy {text!r}: use latest, latest:N (N >= 1) or specific:V[,V...]"
        )

    def select(self, available: list[int]) -> list[int]:
        """The versions to serve out of ``available`` (complete versions on disk), ascending."""
        if self.latest is not None:
            return sorted(available)[-self.latest :]
        return [v for v in sorted(available) if v in self.specific]

    def __str__(self) -> str:
        if self.latest is not None:
            return "latest" if self.latest == 1 else f"latest:{self.latest}"
        return "specific:" + ",".join(map(str, self.specific))
