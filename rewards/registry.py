"""The reward registry: names -> reward functions, and ``pkg.module:function`` references.

A reward is a plain callable. A per-sample reward takes one ``Sample`` (plus the recipe's ``kwargs``) and returns
a float, a dict of named floats, or None ("not applicable to this sample"); a batched reward
(``@register_reward(name, batched=True)``) takes ``list[Sample]`` and returns one such value per sample.

    @register_reward("my_reward")
    def my_reward(sample: Sample, *, bonus: float = 1.0) -> float: ...

Recipes name a reward by its registered name or as ``pkg.module:function`` (imported with importlib, never from a
file path or URL). This module owns the one reference grammar (``check_reward_spec``). A reference resolves only
to a function declared as a reward, by ``@register_reward(name)`` or by the ``@reward`` marker, never to any other
callable (``pydoc:pipepager`` is refused), and the module is never looked up in the current working directory
unless that folder is on ``PYTHONPATH`` explicitly. Naming a module still imports it, which runs its top-level code
as any Python import does: name only modules you trust. A float subclass ``Verdict`` lets a reward attach a reason (e.g. "no answer found") that the
scorer records in ``RewardResult.errors`` while the score itself counts normally.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cascade_rl.types import RewardTermConfig

RewardFn = Callable[..., Any]

_REGISTRY: dict[str, RewardFn] = {}
_BATCHED_ATTR = "__reward_batched__"
_NAME_ATTR = "__reward_name__"
_MARK_ATTR = "__cascade_reward__"
_SPEC_RE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_NAME_RE = re.compile(r"[A-Za-z_][\w.\-]*")


class RewardLookupError(ValueError):
    """A reward name or ``module:function`` reference that cannot be resolved; the message says why."""


class Verdict(float):
    """A score with a reason attached: ``Verdict(0.0, "no \\\\boxed{} answer")`` behaves as the float 0.0."""

    reason: str

    def __new__(cls, value: float, reason: str = "") -> Verdict:
        obj = super().__new__(cls, value)
        obj.reason = reason
        return obj

    def __reduce__(self) -> tuple[Any, ...]:
        return (Verdict, (float(self), self.reason))


def _origin(fn: RewardFn) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def register_reward(name: str, batched: bool = False) -> Callable[[RewardFn], RewardFn]:
    """Register ``fn`` under ``name``; the function is returned unchanged (so ``module:function`` works too).

    A second, different function under the same name is refused; re-registering the same function (a module
    reloaded) is allowed.
    """
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ValueError(f"reward name {name!r} is not valid: use letters, digits, '_', '-', '.' "
                         "(':' is reserved for module:function references)")

    def wrap(fn: RewardFn) -> RewardFn:
        old = _REGISTRY.get(name)
        if old is not None and _origin(old) != _origin(fn):
            raise ValueError(
                f"reward name {name!r} is registered twice: first by {_origin(old)} (module {old.__module__}), "
                f"again by {_origin(fn)} (module {fn.__module__}). Rename one of them, e.g. "
                f"@register_reward({name + '_v2'!r}).")
        setattr(fn, _BATCHED_ATTR, bool(batched))
        setattr(fn, _NAME_ATTR, name)
        setattr(fn, _MARK_ATTR, True)
        _REGISTRY[name] = fn
        return fn

    return wrap


def reward(fn: RewardFn | None = None, *, batched: bool = False) -> Any:
    """Mark ``fn`` as a reward without registering a name, so a recipe may reference it as ``module:function``.

        @reward
        def my_score(sample: Sample) -> float: ...

        @reward(batched=True)
        def my_batch(samples: list[Sample]) -> list[float]: ...
    """
    def wrap(f: RewardFn) -> RewardFn:
        setattr(f, _BATCHED_ATTR, bool(batched))
        setattr(f, _MARK_ATTR, True)
        return f

    return wrap(fn) if fn is not None else wrap


def is_reward(fn: Any) -> bool:
    """Whether ``fn`` was declared a reward (``@register_reward`` or ``@reward``)."""
    return getattr(fn, _MARK_ATTR, False) is True


def is_batched(fn: RewardFn) -> bool:
    """Whether ``fn`` takes a list of samples (set by ``register_reward(..., batched=True)`` or ``fn.batched``)."""
    return bool(getattr(fn, _BATCHED_ATTR, getattr(fn, "batched", False)))


def check_reward_spec(spec: Any, key: str = "reward") -> None:
    """Raise ``RewardLookupError`` (a ``ValueError``, message starting with ``key``) unless ``spec`` is a
    registered-name-like string or ``pkg.module:function``: the one reward-reference grammar. Nothing is imported.

    A recipe travels to a cluster and is run there: a reward is code already installed on the nodes, never
    fetched from a URL or loaded from a file path named in the recipe.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise RewardLookupError(f"{key}: a reward is named by a registered name (e.g. math_verify) or "
                                f"`pkg.module:function`; got {spec!r}")
    s = spec.strip()
    if "://" in s or s.lower().startswith(("file:", "data:", "http:", "https:")):
        raise RewardLookupError(f"{key}={spec!r}: rewards cannot be loaded from a URL (file path or URL refused). "
                                f"Install the code on the cluster and name it as `pkg.module:function`.")
    if any(c in s for c in "/\\~") or s.startswith(".") or s.endswith((".py", ".pyc", ".so")):
        raise RewardLookupError(f"{key}={spec!r}: rewards cannot be loaded from a file path (file path or URL "
                                f"refused). Put the function in an importable module and name it as "
                                f"`pkg.module:function` (e.g. my_rewards.math:score), or register it in rewards/.")
    if ":" in s:
        if not _SPEC_RE.match(s):
            raise RewardLookupError(f"{key}={spec!r} is not of the form `pkg.module:function` (Python "
                                    f"identifiers on both sides of one colon)")
    elif not _NAME_RE.fullmatch(s):
        raise RewardLookupError(f"{key}={spec!r}: a registered reward name has letters, digits, `_`, `-` and "
                                f"`.` only (registered name expected)")


def _check_spec(spec: str) -> None:
    check_reward_spec(spec, key="reward")


def _is_implicit_cwd(entry: str) -> bool:
    """A ``sys.path`` entry that is the working directory and was not asked for in ``PYTHONPATH``."""
    cwd = os.getcwd()
    explicit = {os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p}
    return (entry == "" or os.path.abspath(entry) == cwd) and cwd not in explicit


@contextlib.contextmanager
def _without_implicit_cwd() -> Any:
    """Import with the working directory left off ``sys.path`` (``python -m`` puts it first implicitly)."""
    saved = list(sys.path)
    sys.path[:] = [p for p in saved if not _is_implicit_cwd(p)]
    try:
        yield
    finally:
        kept = [p for p in sys.path if p not in saved]  # entries the import itself added stay
        sys.path[:] = saved + kept


def _import_ref(spec: str) -> RewardFn:
    if not _SPEC_RE.match(spec):
        raise RewardLookupError(f"reward {spec!r} is not of the form `pkg.module:function` "
                                "(dotted module path, one ':', then the function name)")
    module_name, _, attr = spec.partition(":")
    try:
        with _without_implicit_cwd():
            obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise RewardLookupError(f"reward {spec!r}: cannot import module {module_name!r} ({exc}); is it installed or "
                                "on PYTHONPATH? The working directory is not searched unless PYTHONPATH names "
                                "it.") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RewardLookupError(f"reward {spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise RewardLookupError(f"reward {spec!r}: {attr!r} is a {type(obj).__name__}, not a function")
    if not is_reward(obj):
        raise RewardLookupError(f"reward {spec!r}: {attr!r} is not declared as a reward. Only functions decorated "
                                "with @reward or @register_reward(name) (from cascade_rl.rewards) can be named in "
                                "a recipe; any other callable is refused.")
    return obj


def get_reward(spec: str) -> RewardFn:
    """The reward function for a registered name or a ``pkg.module:function`` reference.

    Raises ``RewardLookupError`` (a ``ValueError``) naming the registered rewards (and the closest one) when the
    name is unknown, or explaining why a reference cannot be imported.
    """
    _check_spec(spec)
    if ":" in spec:
        return _import_ref(spec)
    if spec in _REGISTRY:
        return _REGISTRY[spec]
    close = difflib.get_close_matches(spec, list(_REGISTRY), n=1, cutoff=0.6)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise RewardLookupError(f"unknown reward {spec!r}.{hint} Registered rewards: {', '.join(sorted(_REGISTRY))}. "
                            "Or reference your own function as `pkg.module:function`.")


def _doc_line(fn: RewardFn) -> str:
    doc = (getattr(fn, "__doc__", None) or "").strip()
    return doc.splitlines()[0].strip() if doc else ""


def list_rewards() -> dict[str, tuple[RewardFn, str, bool]]:
    """``{name: (function, first line of its docstring, batched)}`` for every registered reward, sorted."""
    return {name: (fn, _doc_line(fn), is_batched(fn)) for name, fn in sorted(_REGISTRY.items())}


@dataclass
class RewardTerm:
    """One resolved term of a recipe's ``reward.terms``: what a scorer (or a worker process) calls."""

    label: str  # component name in RewardResult.components
    spec: str  # as written in the recipe
    weight: float
    kwargs: dict[str, Any] = field(default_factory=dict)
    batched: bool = False
    ref: str = ""  # importable "module:qualname", so a worker process can find the same function
    fn: RewardFn | None = field(default=None, repr=False, compare=False)

    def load(self) -> RewardFn:
        """The function, importing ``ref`` (which registers built-ins and plug-ins) in a fresh process."""
        if self.fn is None:
            self.fn = _import_ref(self.ref) if self.ref else get_reward(self.spec)
        return self.fn


def _importable_ref(fn: RewardFn) -> str:
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or "<" in qualname:
        return ""
    try:
        target: Any = importlib.import_module(module)
        for part in qualname.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError):
        return ""
    return f"{module}:{qualname}" if target is fn else ""


def resolve_terms(terms: list[RewardTermConfig]) -> list[RewardTerm]:
    """Resolve the recipe's reward terms (name or module:function, weight, kwargs); errors name ``reward.terms.<i>.*``.

    Labels are the registered name (or the function name of a reference), suffixed ``_2``, ``_3``... when a
    reward appears more than once.
    """
    out: list[RewardTerm] = []
    for i, term in enumerate(terms):
        if not isinstance(term, RewardTermConfig):
            raise ValueError(f"reward.terms.{i}: expected a RewardTermConfig(name, weight, kwargs), got {term!r}")
        spec, weight, kwargs = term.name, term.weight, term.kwargs
        try:
            fn = get_reward(spec)
        except RewardLookupError as exc:
            raise RewardLookupError(f"reward.terms.{i}.name: {exc}") from exc
        if not isinstance(weight, (int, float)) or weight != weight:
            raise ValueError(f"reward.terms.{i}.weight={weight!r}: must be a number")
        if not isinstance(kwargs, dict):
            raise ValueError(f"reward.terms.{i}.kwargs: must be a mapping, got {type(kwargs).__name__}")
        base = spec if ":" not in spec else spec.rsplit(":", 1)[1].split(".")[-1]
        label, n = base, 2
        while any(t.label == label for t in out):
            label, n = f"{base}_{n}", n + 1
        out.append(RewardTerm(label=label, spec=spec, weight=float(weight), kwargs=dict(kwargs),
                              batched=is_batched(fn), ref=_importable_ref(fn), fn=fn))
    return out
