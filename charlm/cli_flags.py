"""Command-line flags generated from a config dataclass's fields: `--field-name` (plus the
spellings in the field's `flags`, e.g. char-rnn's), with the type, default, choices and help
that the field itself declares (charlm.config._opt). Nothing here restates a default."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def _base_type(annotation: Any) -> type:
    """int/float/str/bool of an annotation (a string under `from __future__ import annotations`),
    `X | None` included."""
    if isinstance(annotation, type):
        return annotation
    names = [t.strip() for t in str(annotation).split("|") if t.strip() != "None"]
    if len(names) != 1 or names[0] not in _TYPES:
        raise TypeError(f"no command-line type for a config field annotated {annotation!r}")
    return _TYPES[names[0]]


def add_config_flags(
    parser: argparse.ArgumentParser,
    config_cls: type,
    *,
    group_titles: dict[str, str] | None = None,
    skip: tuple[str, ...] = (),
) -> dict[str, argparse._ArgumentGroup]:
    """Add a flag for each field of config_cls (except `skip`), in argument groups named by the
    fields' `group` (titled by group_titles where given). Returns the groups by name, so a caller
    can add flags that are not config fields (e.g. --device) beside them."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(config_cls):
        if f.name in skip:
            continue
        meta = f.metadata
        group = meta.get("group", "options")
        if group not in groups:
            groups[group] = parser.add_argument_group((group_titles or {}).get(group, group))
        names = ["--" + f.name.replace("_", "-"), *meta.get("flags", ())]
        kind = _base_type(f.type)
        help_text = meta.get("help", "")
        if kind is bool:
            groups[group].add_argument(*names, dest=f.name, action="store_true", help=help_text)
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        if default is not None and "(default" not in help_text:
            help_text = f"{help_text} (default %(default)s)" if help_text else "(default %(default)s)"
        kw: dict[str, Any] = {"dest": f.name, "type": kind, "default": default, "help": help_text}
        if meta.get("choices"):
            kw["choices"] = meta["choices"]
        if meta.get("metavar"):
            kw["metavar"] = meta["metavar"]
        groups[group].add_argument(*names, **kw)
    return groups
