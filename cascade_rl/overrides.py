"""Recipe override parsing (``key=value`` on the command line) and the errors that name the key at fault.

- ``key`` is dotted; list items are addressed by index (``stages.2.gspo.num_steps=5``). An index one past the
  end appends an item (``reward.terms.1.name=format`` adds a second term); further past the end is an error
  saying how many items there are.
- ``value`` is parsed as YAML (``seed=1``, ``reward.terms=[{name: format}]``, ``data.system_prompt="a: b"``).
  A list literal for a list of settings (stages, reward terms) is checked item by item, so a typo names its
  item (``reward.terms.0.wieght``).
- Bad syntax (an empty key part as in ``stages..x``, an unclosed bracket as in ``seed=[1``) is a one-line
  ``ConfigError``, never a traceback.
"""

from __future__ import annotations

import difflib
from dataclasses import MISSING, fields, is_dataclass
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from .config import ConfigError, MPOTermConfig, RecipeConfig, RewardTermConfig, StageConfig, list_item_type

LIST_SCHEMAS: dict[str, type] = {"stages": StageConfig, "reward.terms": RewardTermConfig,
                                 "stages.mpo.terms": MPOTermConfig}


def _known_keys(node: Any) -> list[str]:
    return [f.name for f in fields(node)] if is_dataclass(node) else []


def explain(exc: OmegaConfBaseException, source: str) -> ConfigError:
    """Turn an OmegaConf error into one naming the key, the file and a likely fix."""
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None) or "?"
    msg = getattr(exc, "msg", str(exc)).split("\n")[0]
    if isinstance(exc, (ConfigKeyError, ConfigAttributeError)):
        leaf = str(key).split(".")[-1]
        parent_key = str(key).rsplit(".", 1)[0] if "." in str(key) else ""
        candidates = _keys_at(parent_key)
        close = difflib.get_close_matches(leaf, candidates, n=1, cutoff=0.5)
        hint = f" Did you mean `{(parent_key + '.' if parent_key else '') + close[0]}`?" if close else ""
        valid = f" Valid keys here: {', '.join(candidates)}." if candidates else ""
        return ConfigError(f"{source}: unknown key `{key}`.{hint}{valid}")
    if isinstance(exc, ValidationError):
        expected = _type_at(str(key))
        return ConfigError(f"{source}: wrong type for `{key}`: {msg}" + (f" (expected {expected})" if expected else ""))
    return ConfigError(f"{source}: {msg} (key `{key}`)")


def _node_at(dotted: str) -> Any:
    node: Any = RecipeConfig
    for part in [p for p in dotted.split(".") if p]:
        if part.isdigit() or (part.startswith("[") and part.endswith("]")):
            continue
        hints = {f.name: f for f in fields(node)} if is_dataclass(node) else {}
        if part not in hints:
            return None
        f = hints[part]
        node = f.default_factory() if f.default_factory is not MISSING else f.default
        if isinstance(node, list):
            node = list_item_type(f)
    return node


def _keys_at(dotted: str) -> list[str]:
    node = _node_at(dotted.replace("[", ".").replace("]", ""))
    return _known_keys(node)


def _type_at(dotted: str) -> str:
    parts = dotted.replace("[", ".").replace("]", "").split(".")
    parent = _node_at(".".join(parts[:-1]))
    if not is_dataclass(parent):
        return ""
    for f in fields(parent):
        if f.name == parts[-1]:
            return str(f.type)
    return ""


def _check_items(dotted: str, items: Any, schema: type, source: str, start: int = 0) -> None:
    """Merge list items onto their schema one by one, innermost lists first, so an error names
    ``<list>.<index>.<key>`` (``stages.1.mpo.terms.0.los``)."""
    for i, item in enumerate(items, start=start):
        _check_nested(item, schema, f"{dotted}.{i}.", source)
        try:
            OmegaConf.merge(OmegaConf.structured(schema), item)
        except OmegaConfBaseException as exc:
            key = getattr(exc, "full_key", None) or getattr(exc, "key", None) or ""
            exc.full_key = f"{dotted}.{i}.{key}" if key else f"{dotted}.{i}"
            raise explain(exc, source) from None


def _check_nested(node: Any, schema: type, where: str, source: str) -> None:
    """Walk ``node`` along ``schema``, checking each ``list[XConfig]`` field's items with ``_check_items``."""
    if not isinstance(node, DictConfig):
        return
    for f in fields(schema):
        item_type = list_item_type(f)
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        sub = node.get(f.name) if f.name in node and (item_type or is_dataclass(default)) else None
        if item_type is not None and isinstance(sub, ListConfig):
            _check_items(f"{where}{f.name}", sub, item_type, source)
        elif is_dataclass(default):
            _check_nested(sub, type(default), f"{where}{f.name}.", source)


def check_list_items(raw: DictConfig, source: str) -> None:
    """Merge every list item (stages, their MPO terms, reward terms) one by one so an error can name its index."""
    _check_nested(raw, RecipeConfig, "", source)


def _schema_key(parts: list[str]) -> str:
    return ".".join(p for p in parts if not p.isdigit())


def _grow_lists(merged: DictConfig, parts: list[str], source: str) -> None:
    """Append an item where an index is one past a list's end; refuse an index further out."""
    for j, part in enumerate(parts):
        if not part.isdigit() or j == 0:
            continue
        prefix = ".".join(parts[:j])
        node = OmegaConf.select(merged, prefix, default=None)
        if not isinstance(node, ListConfig):
            continue
        index = int(part)
        if index == len(node):
            schema = LIST_SCHEMAS.get(_schema_key(parts[:j]))
            node.append(OmegaConf.structured(schema) if schema else {})
        elif index > len(node):
            raise ConfigError(f"{source}: `{prefix}` has {len(node)} item(s) (indices 0-{len(node) - 1}), so "
                              f"`{prefix}.{index}` is past its end; use an index up to {len(node)} (one past the "
                              f"end appends an item)")


def _parse(item: str) -> tuple[str, Any]:
    source = f"command-line override `{item}`"
    if "=" not in item:
        raise ConfigError(f"{source} is not of the form key=value (e.g. seed=1)")
    key, text = item.split("=", 1)
    parts = key.strip().split(".")
    if not key.strip() or any(not p.strip() for p in parts) or any(c in key for c in " []{}"):
        raise ConfigError(f"{source}: key `{key}` is not a dotted key path (an empty part or a bracket); write "
                          f"keys like stages.0.gspo.num_steps or reward.terms.1.name")
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError as exc:
        why = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{source}: value `{text}` is not valid YAML ({why}); close the bracket or quote the "
                          f"value, e.g. {key}='{text}'") from None
    return key.strip(), value


def apply_override(merged: DictConfig, item: str) -> None:
    """Apply one ``key=value`` override to the merged recipe, raising a one-line ``ConfigError`` on any problem."""
    source = f"command-line override `{item}`"
    key, value = _parse(item)
    parts = key.split(".")
    _grow_lists(merged, parts, source)
    schema = LIST_SCHEMAS.get(_schema_key(parts))
    if schema is not None and isinstance(value, list):  # a list literal of settings: check each item
        _check_items(key, value, schema, source)
    elif parts[-1].isdigit() and len(parts) > 1 and LIST_SCHEMAS.get(_schema_key(parts[:-1])) and \
            isinstance(value, dict):
        _check_items(".".join(parts[:-1]), [value], LIST_SCHEMAS[_schema_key(parts[:-1])], source, int(parts[-1]))
    try:
        OmegaConf.update(merged, key, value, merge=True)
    except OmegaConfBaseException as exc:
        raise explain(exc, source) from None
    except (TypeError, ValueError, IndexError) as exc:  # OmegaConf raises these for some malformed paths
        raise ConfigError(f"{source}: {exc}") from None
