"""Settings as people write them (YAML files, `--set KEY=VALUE`), read into typed values.

Whatever is wrong with them, a YAML syntax error, a file that is a directory or not
UTF-8, a value of the wrong type, becomes a ValueError or OSError on one line that
names the file or the setting, which the commands report as it is (`shards.cli`)
instead of a traceback from deep inside the code that first tripped over the value.
The YAML readers (`read_yaml`, `parse_yaml`) are shared with scn_scale, so they live in `shards.cli`.
"""

from __future__ import annotations

import types
import typing
from typing import Any


def coerce(value: Any, hint: Any, name: str) -> Any:
    """`value` (as YAML read it) checked against the type `hint` of the setting `name`.

    Covers what settings are made of (int, float, which takes an int, str, bool, unions
    such as `int | None`, tuples, dicts); other types pass unchecked. A mismatch is a
    ValueError naming the setting, where it would otherwise surface later as a TypeError.
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        failures = []
        for member in (a for a in args if a is not type(None)):
            try:
                return coerce(value, member, name)
            except ValueError as exc:
                failures.append(exc)
        raise failures[0]
    if origin is tuple:
        items = tuple(value) if isinstance(value, (list, tuple)) else (value,)
        kinds = [args[0]] * len(items) if args[-1] is Ellipsis else list(args)
        if len(kinds) != len(items):
            raise ValueError(f"setting {name}: expected {len(kinds)} values, got {value!r}")
        return tuple(coerce(item, kind, f"{name}[{i}]") for i, (item, kind) in enumerate(zip(items, kinds)))
    if origin is dict and not isinstance(value, dict):
        raise ValueError(f"setting {name}: expected a mapping, got {value!r}")
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    # YAML's `true` is an int to isinstance, and 1 is no bool: bools only where a bool is expected.
    if hint in (int, float, str, bool) and (not isinstance(value, hint) or isinstance(value, bool) != (hint is bool)):
        raise ValueError(f"setting {name}: expected {hint.__name__}, got {value!r}")
    return value
