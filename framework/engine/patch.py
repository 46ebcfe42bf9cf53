"""Instance-attribute patches that restore the exact original on removal.

Wrappers replace ``module.forward`` (or a scheduler method) on the *instance*; the class and its
code are never copied or modified, and removing the patch deletes the instance attribute (or
puts back one that was there before, e.g. another library's hook).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_MISSING = object()


class Patch:
    """Set ``obj.attr = value`` now; ``undo`` restores what was there before."""

    def __init__(self, obj: Any, attr: str, value: Any) -> None:
        self.obj, self.attr = obj, attr
        self._previous = obj.__dict__.get(attr, _MISSING)
        object.__setattr__(obj, attr, value)

    def undo(self) -> None:
        if self._previous is _MISSING:
            object.__delattr__(self.obj, self.attr)
        else:
            object.__setattr__(self.obj, self.attr, self._previous)


class PatchSet:
    """Patches installed so far, undone in reverse order (also after a failure part-way)."""

    def __init__(self) -> None:
        self._patches: list[Any] = []

    def set(self, obj: Any, attr: str, value: Any) -> None:
        self._patches.append(Patch(obj, attr, value))

    def add(self, patch: Any) -> None:
        """Hold any object with an ``undo()`` method (a change made elsewhere), undone in order."""
        self._patches.append(patch)

    def wrap_forward(self, module: Any, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
        """Replace ``module.forward`` by ``make(original_forward)``."""
        self.set(module, "forward", make(module.forward))

    def wrap_method(
        self, obj: Any, name: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]
    ) -> None:
        self.set(obj, name, make(getattr(obj, name)))

    def undo(self) -> None:
        while self._patches:
            self._patches.pop().undo()

    def __len__(self) -> int:
        return len(self._patches)
