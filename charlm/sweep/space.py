"""A sweep's search space over TrainConfig's fields: read from a YAML/JSON file or --grid flags,
checked whole before anything starts (an unknown field or a bad range is refused in one line
naming the file and the key), and turned into Ray Tune's param_space.

The file is one mapping, field -> range, each range a mapping with exactly one kind:

    lr: {loguniform: [1.0e-4, 1.0e-2]}     # lo > 0, lo < hi
    dropout: {uniform: [0.0, 0.4]}         # lo < hi
    num_layers: {int: [1, 3]}              # integers, lo <= hi, both ends included
    hidden_size: {choice: [128, 256]}      # one of these, drawn at random per trial
    cell: {grid: [lstm, gru]}              # every value, crossed with the other grid keys

`--grid KEY=V1,V2` is `KEY: {grid: [V1, V2]}`, each value parsed as the field's type.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from charlm.config import TrainConfig

KINDS = ("choice", "grid", "uniform", "loguniform", "int")
# Fields a sweep cannot vary: the data is resolved once for every trial (its split fractions
# decide it), and these say how a run is evaluated and logged rather than what it learns.
FIXED_FIELDS = ("val_frac", "test_frac", "eval_every", "log_every", "eval_max_batches")


class SpaceError(ValueError):
    """A search space that cannot run; one line naming the file (or --grid) and the key."""


@dataclass(frozen=True)
class Param:
    """One swept field: its kind and values (choice/grid) or bounds (the ranges)."""

    key: str
    kind: str
    values: tuple[Any, ...]

    def to_dict(self) -> dict[str, Any]:
        return {self.kind: list(self.values)}


@dataclass(frozen=True)
class Space:
    """A checked search space; `source` names where it came from (a file or --grid)."""

    params: tuple[Param, ...]
    source: str

    def to_dict(self) -> dict[str, Any]:
        return {p.key: p.to_dict() for p in self.params}

    @property
    def grid_size(self) -> int:
        return math.prod(len(p.values) for p in self.params if p.kind == "grid")

    @property
    def has_random(self) -> bool:
        return any(p.kind != "grid" for p in self.params)

    def tune_space(self) -> dict[str, Any]:
        """Ray Tune's param_space: {"train": {field: domain}}."""
        from ray import tune

        def domain(p: Param) -> Any:
            if p.kind == "grid":
                return tune.grid_search(list(p.values))
            if p.kind == "choice":
                return tune.choice(list(p.values))
            if p.kind == "uniform":
                return tune.uniform(*p.values)
            if p.kind == "loguniform":
                return tune.loguniform(*p.values)
            return tune.randint(p.values[0], p.values[1] + 1)  # randint's upper end is excluded

        return {"train": {p.key: domain(p) for p in self.params}}


def _fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(TrainConfig)}


def _field_kind(key: str) -> str:
    """'int' | 'float' | 'str' | 'bool' of a TrainConfig field (`X | None` counts as X)."""
    names = [t.strip() for t in str(_fields()[key].type).split("|") if t.strip() != "None"]
    return names[0]


def _number(where: str, key: str, v: Any, integer: bool) -> float | int:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise SpaceError(f"{where}: {key}: {v!r} is not a finite number")
    if integer and float(v) != int(v):
        raise SpaceError(f"{where}: {key}: {v!r} is not an integer")
    return int(v) if integer else float(v)


def _value(where: str, key: str, v: Any) -> Any:
    """A choice/grid value checked against the field's type."""
    kind = _field_kind(key)
    if kind == "int":
        return _number(where, key, v, integer=True)
    if kind == "float":
        return _number(where, key, v, integer=False)
    if kind == "bool":
        if not isinstance(v, bool):
            raise SpaceError(f"{where}: {key}: {v!r} is not true or false")
        return v
    if not isinstance(v, str):
        raise SpaceError(f"{where}: {key}: {v!r} is not a string")
    return v


def _param(where: str, key: Any, spec: Any) -> Param:
    fields = _fields()
    if not isinstance(key, str) or key not in fields:
        raise SpaceError(f"{where}: {key}: not a TrainConfig field (`charlm train --help` lists them)")
    if key in FIXED_FIELDS:
        raise SpaceError(
            f"{where}: {key}: cannot vary within one sweep (set it with --{key.replace('_', '-')})"
        )
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
        raise SpaceError(f"{where}: {key}: want one of {{{', '.join(k + ': [...]' for k in KINDS)}}}")
    kind, vals = next(iter(spec.items()))
    if not isinstance(vals, list) or not vals:
        raise SpaceError(f"{where}: {key}: {kind} wants a non-empty list")
    field_kind = _field_kind(key)
    if kind in ("choice", "grid"):
        values = tuple(_value(where, key, v) for v in vals)
        if len(set(values)) != len(values):
            raise SpaceError(f"{where}: {key}: {kind} lists a value twice")
        return Param(key, kind, values)
    if len(vals) != 2:
        raise SpaceError(f"{where}: {key}: {kind} wants [lo, hi]")
    if field_kind not in ("int", "float") or (field_kind == "int" and kind != "int"):
        want = "int" if field_kind == "int" else "choice or grid"
        raise SpaceError(f"{where}: {key}: a {field_kind} field; use {want}, not {kind}")
    lo, hi = (_number(where, key, v, integer=kind == "int") for v in vals)
    if kind == "int" and lo > hi:
        raise SpaceError(f"{where}: {key}: int range [{lo}, {hi}] is empty (want lo <= hi)")
    if kind != "int" and not lo < hi:
        raise SpaceError(f"{where}: {key}: {kind} range [{lo}, {hi}] is empty (want lo < hi)")
    if kind == "loguniform" and lo <= 0:
        raise SpaceError(f"{where}: {key}: loguniform needs lo > 0, got {lo}")
    return Param(key, kind, (lo, hi))


def _check_against(where: str, params: tuple[Param, ...], base: TrainConfig) -> None:
    """Every value (both ends of a range) gives a valid TrainConfig on its own."""
    for p in params:
        for v in p.values:
            try:
                base.replace(**{p.key: v})
            except (ValueError, TypeError) as e:
                raise SpaceError(f"{where}: {p.key}: {v!r} is refused by TrainConfig ({e})") from None


def parse_space(obj: Any, where: str, base: TrainConfig | None = None) -> Space:
    """A Space from a parsed mapping (where: the file name, for errors); checked against base."""
    if not isinstance(obj, dict) or not obj:
        raise SpaceError(f"{where}: want a non-empty mapping of TrainConfig fields to ranges")
    params = tuple(_param(where, k, v) for k, v in obj.items())
    if base is not None:
        _check_against(where, params, base)
    return Space(params, where)


def load_space(path: str | Path, base: TrainConfig | None = None) -> Space:
    """The space in a YAML (.yaml/.yml) or JSON file, checked; SpaceError naming the file else."""
    p = Path(path)
    if not p.is_file():
        raise SpaceError(f"{path}: no such space file" if not p.exists() else f"{path}: not a file")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            obj = yaml.safe_load(text)
        else:
            obj = json.loads(text)
    except Exception as e:  # yaml.YAMLError, json.JSONDecodeError
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SpaceError(
            f"{path}: not valid {'YAML' if p.suffix.lower() in ('.yaml', '.yml') else 'JSON'}: {first}"
        ) from None
    return parse_space(obj, str(path), base)


def _parse_scalar(key: str, text: str) -> Any:
    kind = _field_kind(key) if key in _fields() else "str"
    try:
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
    except ValueError:
        raise SpaceError(
            f"--grid {key}: {text!r} is not a{'n int' if kind == 'int' else ' number'}"
        ) from None
    if kind == "bool":
        if text.lower() not in ("true", "false"):
            raise SpaceError(f"--grid {key}: {text!r} is not true or false")
        return text.lower() == "true"
    return text


def grid_space(items: list[str], base: TrainConfig | None = None) -> Space:
    """A Space from --grid KEY=V1,V2 items (each a grid key)."""
    obj: dict[str, Any] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not values.strip():
            raise SpaceError(f"--grid {item}: want KEY=V1,V2,...")
        if key in obj:
            raise SpaceError(f"--grid {key}: given twice")
        obj[key] = {"grid": [_parse_scalar(key, v.strip()) for v in values.split(",")]}
    return parse_space(obj, "--grid", base)


def merge(a: Space | None, b: Space | None) -> Space:
    """Two spaces (a file and --grid) as one; a key in both is refused."""
    if a is None or b is None:
        got = a or b
        if got is None:
            raise SpaceError("no search space: give --space FILE or --grid KEY=V1,V2")
        return got
    both = {p.key for p in a.params} & {p.key for p in b.params}
    if both:
        raise SpaceError(f"{a.source}: {sorted(both)[0]}: also given by --grid")
    return Space(a.params + b.params, f"{a.source} + --grid")
