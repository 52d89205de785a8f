"""Replacing methods of another library's classes, and putting back exactly what was there.

``install`` records what each class's own ``__dict__`` held under each name (or that it held nothing: the method
was inherited) before the first replacement; ``uninstall`` restores that record exactly, deleting what the class
did not define itself. So a method PEFT defines on the class itself comes back, and an inherited one is inherited
again, whichever PEFT release is installed.
"""

from __future__ import annotations

from typing import Any, Callable

_MISSING = object()


class Patches:
    def __init__(self, replacements: list[tuple[type, str, Callable]]):
        self.replacements = replacements
        self.saved: dict[tuple[type, str], Any] = {}

    def install(self) -> None:
        for cls, name, fn in self.replacements:
            if (cls, name) not in self.saved:
                self.saved[(cls, name)] = vars(cls).get(name, _MISSING)
            setattr(cls, name, fn)

    def uninstall(self) -> None:
        for (cls, name), original in self.saved.items():
            if original is _MISSING:
                if name in vars(cls):
                    delattr(cls, name)
            else:
                setattr(cls, name, original)
        self.saved.clear()
