"""Which rule serves which op: a registry keyed by (domain, op type), versioned by opset.

Three layers, searched in this order: rules passed to one Explainer (`rules=`), user
rules (the `register_rule` decorator, or packages exposing the `liftir.rules` entry
point group), and the built-in rules of `liftir.rules`. A user rule for an op type
therefore overrides the built-in one without touching it.
"""
from __future__ import annotations

import importlib
import warnings
from importlib.metadata import entry_points
from typing import Callable, Mapping

from .errors import InputError, LiftirError
from .rule import Rule

ENTRY_POINT_GROUP = "liftir.rules"

# (domain, op_type) -> list of (since_opset, rule), kept sorted by since_opset
_builtin: dict[tuple[str, str], list[tuple[int, Rule]]] = {}
_user: dict[tuple[str, str], list[tuple[int, Rule]]] = {}
_loaded = {"builtins": False, "plugins": False}


def _add(table, rule_cls, op_types, domain, since, replace):
    rule = rule_cls() if isinstance(rule_cls, type) else rule_cls
    if not isinstance(rule, Rule):
        raise LiftirError(f"{rule_cls!r} is not a liftir.rule.Rule (subclass liftir.rule.Rule)")
    names = op_types or getattr(rule, "op_types", ())
    if not names:
        raise LiftirError(f"{rule_cls!r}: name the op types it serves, e.g. @register_rule(\"MyOp\")")
    dom = domain if domain is not None else getattr(rule, "domain", "")
    for op in names:
        entries = table.setdefault((dom, op), [])
        clash = [e for e in entries if e[0] == since]
        if clash and not replace:
            raise LiftirError(f"a rule for {op!r} (domain {dom!r}, since opset {since}) is already "
                              f"registered: {type(clash[0][1]).__name__}; pass replace=True to replace it")
        entries[:] = sorted([e for e in entries if e[0] != since] + [(since, rule)], key=lambda e: e[0])
    if isinstance(rule_cls, type):
        rule_cls.op_types = tuple(names)
        rule_cls.domain = dom
    return rule_cls


def register_rule(*op_types: str, domain: str | None = None, since: int = 1,
                  replace: bool = False) -> Callable:
    """Class decorator: make a Rule serve `op_types` (overrides built-in rules for them).

    `since` is the first opset version the rule applies to (lookup takes the newest
    rule whose `since` is <= the model's opset for that domain).
    """
    def decorate(rule_cls):
        return _add(_user, rule_cls, op_types, domain, since, replace)
    return decorate


def builtin_rule(*op_types: str, domain: str | None = None, since: int = 1) -> Callable:
    """Like `register_rule`, for the rules shipped in `liftir.rules`."""
    def decorate(rule_cls):
        return _add(_builtin, rule_cls, op_types, domain, since, False)
    return decorate


def unregister_rule(op_type: str, domain: str = "") -> None:
    """Remove the user rules for an op type (the built-in rule, if any, serves again)."""
    _user.pop((domain, op_type), None)


def _ensure_loaded() -> None:
    if not _loaded["builtins"]:
        _loaded["builtins"] = True
        importlib.import_module("liftir.rules")
    if not _loaded["plugins"]:
        _loaded["plugins"] = True
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            try:
                obj = ep.load()  # importing the module registers its rules
            except Exception as exc:  # a broken plugin must not break liftir
                warnings.warn(f"liftir rule plugin {ep.name!r} ({ep.value}) failed to load: {exc}",
                              stacklevel=2)
                continue
            if isinstance(obj, type) and issubclass(obj, Rule) and obj.op_types:
                if all((obj.domain, op) not in _user for op in obj.op_types):
                    _add(_user, obj, obj.op_types, obj.domain, 1, False)


def _pick(entries: list[tuple[int, Rule]] | None, opset: int) -> Rule | None:
    if not entries:
        return None
    eligible = [rule for since, rule in entries if since <= opset]
    return eligible[-1] if eligible else None


def check_overrides(overrides: Mapping | None) -> dict[str, Rule] | None:
    """Validate an Explainer's `rules=`: op type (or 'domain::op') -> Rule instance or class.

    Every entry is checked up front, used by the model or not, so that a typo'd value
    fails with the op named instead of deep inside the scheduler.
    """
    if overrides is None:
        return None
    if not isinstance(overrides, Mapping):
        raise InputError(f"rules= must be a mapping of op type -> liftir.rule.Rule (class or "
                         f"instance), got {type(overrides).__name__}")
    checked: dict[str, Rule] = {}
    for key, rule in overrides.items():
        if not isinstance(key, str) or not key or key.startswith("::") or key.endswith("::"):
            raise InputError(f"rules=: keys are op types such as 'Relu' or 'com.example::Swish', "
                             f"got {key!r}")
        if isinstance(rule, type) and issubclass(rule, Rule):
            try:
                rule = rule()
            except Exception as exc:
                raise InputError(f"rules={{{key!r}: {rule.__name__}}}: the rule class cannot be "
                                 f"instantiated without arguments ({exc}); pass an instance") from exc
        if not isinstance(rule, Rule):
            raise InputError(f"rules={{{key!r}: {rule!r}}}: the rule for op {key!r} must be a "
                             f"liftir.rule.Rule subclass or instance, got {type(rule).__name__}")
        checked[key] = rule
    return checked


def lookup(op_type: str, domain: str = "", opset: int = 10**6,
           overrides: Mapping[str, Rule | type] | None = None) -> Rule | None:
    """The rule for an op, or None. `overrides` maps op type (or 'domain::op') to a rule."""
    _ensure_loaded()
    if overrides:
        key = f"{domain}::{op_type}" if domain else op_type
        if key in overrides:
            rule = overrides[key]
            return rule() if isinstance(rule, type) else rule
    return _pick(_user.get((domain, op_type)), opset) or _pick(_builtin.get((domain, op_type)), opset)


def registered_ops() -> dict[tuple[str, str], Rule]:
    """Every (domain, op type) with a rule at the newest opset, user rules winning."""
    _ensure_loaded()
    table = {key: entries[-1][1] for key, entries in _builtin.items()}
    table.update({key: entries[-1][1] for key, entries in _user.items() if entries})
    return dict(sorted(table.items()))


def rule_origin(domain: str, op_type: str) -> str:
    _ensure_loaded()
    return "plugin" if _user.get((domain, op_type)) else "built-in"


def is_builtin(rule: Rule) -> bool:
    """True for the rule objects shipped in liftir.rules (not user or plugin rules)."""
    _ensure_loaded()
    return any(rule is r for entries in _builtin.values() for _, r in entries)
