"""`--set KEY=VALUE` on `tuner run` and `tuner data`: a sweep key overridden from the command line.

KEY is the dotted path a sweep file would nest (`search.r`, `train.max_length`, `model`); VALUE is read as YAML,
so `--set search.r='{min: 8, max: 32}'` and `--set search.quant_bits=4` mean what they would in the file. The
merged mapping is validated like the file: an error names `--set KEY=VALUE`, the key and what is expected, in
the words the file's own error would use.
"""

from __future__ import annotations

import copy
import re
from typing import Any, Sequence

import yaml

from .errors import ConfigError

KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def parse(item: str) -> tuple[list[str], Any]:
    """`search.r=16` -> (['search', 'r'], 16)."""
    key, eq, text = item.partition("=")
    key = key.strip()
    if not eq or not KEY.fullmatch(key):
        raise ConfigError(f"--set {item}", None, "KEY=VALUE with a dotted sweep key, such as search.r=16")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"--set {item}", key, f"a YAML value ({problem})") from None
    if value is None:
        raise ConfigError(f"--set {item}", key, "a value after '=' (a key cannot be unset from the command line)")
    return key.split("."), value


def apply(data: dict, items: Sequence[str], sections: Sequence[str]) -> dict:
    """A copy of the file's mapping with each override set, in order (a later one wins). `sections`: the sweep
    file's top-level keys."""
    out = copy.deepcopy(data)
    for item in items:
        path, value = parse(item)
        if path[0] not in sections:
            raise ConfigError(f"--set {item}", path[0], f"a sweep section or key (one of {', '.join(sections)})")
        node = out
        for depth, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(path[: depth + 1])
                raise ConfigError(f"--set {item}", where, f"a mapping to set {path[depth + 1]} in (it is "
                                                          f"{child!r}); set {where}=VALUE to replace it whole")
            node = child
        node[path[-1]] = value
    return out


def relabel(errors: list[ConfigError], items: Sequence[str]) -> list[ConfigError]:
    """An error about an overridden key names the `--set` that put the value there, not the file."""
    keys = {item.partition("=")[0].strip(): item for item in items}
    out = []
    for err in errors:
        source = next((item for k, item in keys.items()
                       if err.key and (err.key == k or err.key.startswith(k + ".") or err.key.startswith(k + "["))),
                      None)
        if source is None:
            out.append(err)
            continue
        moved = ConfigError.__new__(type(err))  # the same error, said of the --set instead of the file
        moved.__dict__.update(err.__dict__)
        moved.file = f"--set {source}"
        moved.args = (str(err).replace(f"{err.file}: ", f"{moved.file}: ", 1),)
        out.append(moved)
    return out
