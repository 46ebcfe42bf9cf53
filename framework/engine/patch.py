"""Forward wrappers that compose with the hooks other libraries install, in any order.

A wrapper is a :class:`Link`: a small callable object in the module's chain of forwards. The
class and its code are never copied or modified.

Why a link of our own and not diffusers' ``HookRegistry``: the libraries that hook a module's
forward do not share one mechanism. accelerate (``add_hook_to_module``, what
``enable_model_cpu_offload`` installs) keeps the forward it found in ``module._old_forward`` and
on removal writes it back to ``module.forward``; diffusers' ``HookRegistry`` (FirstBlockCache,
Pyramid Attention Broadcast, TaylorSeer, MagCache, group offloading) keeps it in its innermost
``HookFunctionReference``; both restore what *they* saw. A registry hook of ours would be dropped
by accelerate's removal like a plain ``forward`` assignment is, and it costs a pre/post call per
module call on the hot path. So:

- **Install at the bottom.** A link goes directly on the module's own forward, below every hook
  already there: into accelerate's ``_old_forward`` or the innermost diffusers hook when one of
  them holds the class's forward, else on ``module.forward``. Hooks added later wrap it. Either
  way the chain is the one that applying tokenreduce first would give, and another library's
  removal restores something that still contains the link.
- **Remove without snapshots.** On removal a link still in the place it was put is replaced by
  what it wrapped (``forward`` disappears from the instance ``__dict__`` when it was not there
  before: bit-exact to never applying). A link that another hook now holds turns into a
  pass-through instead, so the hooks above keep working, and a later removal of theirs puts back
  only that pass-through.
- **Deep copies are independent.** A link copies the objects its wrapper's closure captured
  (runtime, cells, sub-modules) through the same ``memo`` as the model and rebuilds the wrapper
  around the copied inner forward (a bound method copies onto the copied module), so the copy
  runs its own weights and state and its handle removes its own links.
- **Pickling is refused** with an error that says to remove tokenreduce first (closures cannot be
  pickled, and a saved model should not depend on tokenreduce being importable).
"""

from __future__ import annotations

import copy
import pickle
import types
from collections.abc import Callable
from typing import Any

Forward = Callable[..., Any]
Factory = Callable[[Forward], Forward]

_MISSING = object()

PICKLE_HINT = (
    "a model or pipeline with tokenreduce applied cannot be pickled or saved with torch.save(module): "
    "call handle.remove() (or tokenreduce.remove(model)) first, save, and apply again after loading; "
    "saving the state_dict works while applied"
)


class Link:
    """``make(inner)`` as a callable object that can be turned into a pass-through in place."""

    __slots__ = ("make", "inner", "fn", "__wrapped__")

    def __init__(self, make: Factory, inner: Forward) -> None:
        self.make: Factory | None = make
        self.inner = inner
        self.__wrapped__ = inner  # inspect.signature follows it: pipelines inspect forwards
        self.fn = make(inner)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    @property
    def active(self) -> bool:
        return self.make is not None

    def bypass(self) -> None:
        """Call ``inner`` directly from now on (and drop the wrapper's state)."""
        self.make, self.fn = None, self.inner

    def __deepcopy__(self, memo: dict[int, Any]) -> Link:
        new = Link.__new__(Link)
        memo[id(self)] = new
        inner = copy.deepcopy(self.inner, memo)
        new.inner = new.__wrapped__ = inner
        if self.make is None:
            new.make, new.fn = None, inner
        else:
            new.make = copy_closure(self.make, memo)
            new.fn = new.make(inner)
        return new

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise pickle.PicklingError(PICKLE_HINT)

    def __repr__(self) -> str:
        state = "active" if self.active else "pass-through"
        return f"<tokenreduce Link ({state}) around {self.inner!r}>"


def copy_closure(fn: Any, memo: dict[int, Any]) -> Any:
    """``fn`` with every captured object deep-copied through ``memo`` (functions are otherwise
    copied by reference, which would tie a copied model to the original's state)."""
    if not isinstance(fn, types.FunctionType) or not fn.__closure__:
        return fn
    cells = []
    for cell in fn.__closure__:
        new = memo.get(id(cell))
        if new is None:
            try:
                contents = cell.cell_contents
            except ValueError:  # an empty cell
                new = types.CellType()
            else:
                new = types.CellType(copy.deepcopy(copy_closure(contents, memo), memo))
            memo[id(cell)] = new
        cells.append(new)
    out = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, tuple(cells))
    out.__kwdefaults__, out.__qualname__ = fn.__kwdefaults__, fn.__qualname__
    out.__dict__.update(fn.__dict__)
    return out


def _is_own_forward(fn: Any, module: Any) -> bool:
    """``fn`` is the module's class forward bound to it (possibly under pass-through links)."""
    while isinstance(fn, Link) and not fn.active:
        fn = fn.inner
    return (
        isinstance(fn, types.MethodType)
        and fn.__self__ is module
        and fn.__func__ is getattr(type(module), "forward", None)
    )


def forward_slot(module: Any) -> tuple[Any, str]:
    """Where a forward link goes: ``(holder, attribute)`` right above the class's forward."""
    candidates: list[tuple[Any, str]] = []
    if "_old_forward" in module.__dict__:  # accelerate's add_hook_to_module
        candidates.append((module, "_old_forward"))
    registry = module.__dict__.get("_diffusers_hook")
    refs = getattr(registry, "_fn_refs", None)
    if refs:  # diffusers' HookRegistry: the innermost hook calls the forward it found
        ref = refs[0]
        candidates.append((ref, "forward" if ref.original_forward is None else "original_forward"))
    for holder, attr in candidates:
        if _is_own_forward(getattr(holder, attr, None), module):
            return holder, attr
    return module, "forward"


class Patch:
    """One link installed at ``holder.attr``; ``undo`` unlinks it or turns it into a pass-through."""

    def __init__(self, holder: Any, attr: str, make: Factory, module: Any = None) -> None:
        self.holder, self.attr, self.module = holder, attr, module
        self.previous = holder.__dict__.get(attr, _MISSING)
        inner = getattr(holder, attr)
        while isinstance(inner, Link) and not inner.active:
            inner = inner.inner  # skip pass-throughs left by earlier removals
        self.link = Link(make, inner)
        object.__setattr__(holder, attr, self.link)

    def undo(self) -> None:
        module, link = self.module, self.link
        moved = module is not None and (self.holder is not module or self.attr != "forward")
        if moved and module.__dict__.get("forward") is link:
            # The hook we sat under was removed and put us on top (accelerate and diffusers do).
            if _is_own_forward(link.inner, module):
                object.__delattr__(module, "forward")
            else:
                object.__setattr__(module, "forward", link.inner)
        elif self.holder.__dict__.get(self.attr) is link:
            if self.previous is _MISSING:
                object.__delattr__(self.holder, self.attr)
            else:
                object.__setattr__(self.holder, self.attr, self.previous)
        link.bypass()  # whoever still holds it (a hook installed later) now calls through


class Setting:
    """A plain attribute set now and restored by ``undo``."""

    def __init__(self, obj: Any, attr: str, value: Any) -> None:
        self.obj, self.attr = obj, attr
        self.previous = getattr(obj, attr)
        setattr(obj, attr, value)

    def undo(self) -> None:
        setattr(self.obj, self.attr, self.previous)


class PatchSet:
    """Patches installed so far, undone in reverse order (also after a failure part-way)."""

    def __init__(self) -> None:
        self._patches: list[Any] = []

    def set(self, obj: Any, attr: str, value: Any) -> None:
        """Set a plain (non-callable) attribute, restored on undo."""
        self._patches.append(Setting(obj, attr, value))

    def wrap_forward(self, module: Any, make: Factory) -> None:
        """Wrap ``module``'s forward with ``make(inner_forward)``, below other libraries' hooks."""
        holder, attr = forward_slot(module)
        self._patches.append(Patch(holder, attr, make, module))

    def wrap_method(self, obj: Any, name: str, make: Factory) -> None:
        """Wrap a method of ``obj`` (e.g. a scheduler's ``step``) on the instance."""
        self._patches.append(Patch(obj, name, make))

    def add(self, undoable: Any) -> None:
        """Anything with an ``undo()`` method, undone in order with the rest."""
        self._patches.append(undoable)

    def undo(self) -> None:
        while self._patches:
            self._patches.pop().undo()

    def __len__(self) -> int:
        return len(self._patches)
