"""Typed dataclass configs from YAML with dotted `key.sub=value` overrides; unknown keys are errors."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parent.parent
USER_CONFIG_DIR = Path("configs")  # a ./configs/ in the working directory overlays the built-in ones by name


def _builtin_configs() -> Path:
    """The built-in configs: the installed sommelier_configs package, or configs/ of a source checkout."""
    try:
        from importlib.resources import files
        return Path(str(files("sommelier_configs")))
    except ModuleNotFoundError:
        return REPO_ROOT / "configs"


CONFIG_ROOT = _builtin_configs()


def config_file(kind: str, name_or_path: str | Path) -> Path:
    """A config by path, or by bare name (`tiny`, `sdss`, `cpu.yaml`): ./configs/<kind>/ first, then built-in."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.parent != Path("."):
        # configs/<kind>/x.yaml written relative to a source checkout still means the built-in x.yaml elsewhere.
        return config_file(kind, path.name) if path.parts[-3:-1] == ("configs", kind) else path
    name = path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml"
    for root in (USER_CONFIG_DIR, CONFIG_ROOT):
        if (root / kind / name).is_file():
            return root / kind / name
    return CONFIG_ROOT / kind / name


def config_names(kind: str) -> list[str]:
    """Bare names of every config of a kind, built-in and user overlays."""
    return sorted({p.stem for root in (USER_CONFIG_DIR, CONFIG_ROOT) for p in (root / kind).glob("*.yaml")})


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping, with an error naming the file when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file not found: {path}")
    with open(path) as f:
        data = yaml.safe_load(f)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a YAML mapping at the top level, got {type(data).__name__}")
    return data


def parse_overrides(overrides: list[str] | None) -> dict:
    """Turn ["a.b=1", "c=x"] into a nested dict; values are parsed as YAML scalars/lists."""
    nested: dict = {}
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key.sub=value")
        dotted, raw = item.split("=", 1)
        node = nested
        parts = dotted.strip().split(".")
        if not all(parts):
            raise ValueError(f"override {item!r} has an empty key part")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r} conflicts with another override of {part!r}")
        node[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""
    return nested


def merge(base: dict, update: dict) -> dict:
    """Deep-merge `update` into a copy of `base` (mappings merge, everything else replaces)."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def from_dict(cls: type[T], data: dict, where: str = "config") -> T:
    """Build dataclass `cls` from a mapping, checking keys and types recursively."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping for {cls.__name__}, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown} for {cls.__name__}; valid keys: {sorted(fields)}")
    kwargs = {}
    for name, field in fields.items():
        if name in data:
            kwargs[name] = _coerce(hints[name], data[name], f"{where}.{name}")
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ValueError(f"{where}: missing required key {name!r} for {cls.__name__}")
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, where)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(f"{where}: {value!r} matches none of {hint}: {'; '.join(errors)}")
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else Any
        coerced = [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(coerced) if origin is tuple else coerced
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        key_t, val_t = args if args else (Any, Any)
        return {_coerce(key_t, k, where): _coerce(val_t, v, f"{where}.{k}") for k, v in value.items()}
    if origin is typing.Literal:
        if value not in args:
            raise ValueError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads 3e-4 (no dot) as a string; users mean the number
            return float(value)
        except ValueError:
            raise ValueError(f"{where}: expected float, got {value!r}") from None
    if hint in (int, float) and isinstance(value, bool):
        raise ValueError(f"{where}: expected {hint.__name__}, got a boolean")
    if isinstance(hint, type) and not isinstance(value, hint):
        raise ValueError(f"{where}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict | None = None) -> T:
    """Load `cls` from optional base defaults, a YAML overlay and dotted CLI overrides, in that order."""
    data = dict(base or {})
    if path is not None:
        data = merge(data, read_yaml(path))
    data = merge(data, parse_overrides(overrides))
    return from_dict(cls, data, where=str(path) if path else cls.__name__)


def to_dict(obj: Any) -> Any:
    """A dataclass config as plain YAML/JSON-ready data (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj
