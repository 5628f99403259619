"""docs/configuration.md documents every key of the typed config with its current default."""

import dataclasses
import os
import re
import typing

from nemo_optune.config import RootConfig

DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "configuration.md")


def config_keys(cls, prefix=""):
    """(dotted key, default) for every leaf field; entries of a list of configs as `key[].field`."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key, kind = prefix + f.name, hints[f.name]
        if dataclasses.is_dataclass(kind):
            yield from config_keys(kind, key + ".")
            continue
        yield key, f.default if f.default is not dataclasses.MISSING else f.default_factory()
        item = typing.get_args(kind)[0] if typing.get_origin(kind) is list else None
        if dataclasses.is_dataclass(item):
            yield from config_keys(item, key + "[].")


def as_yaml(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ", ".join(as_yaml(v) for v in value) + "]"
    return str(value)


def documented_defaults() -> dict[str, str]:
    """The reference tables' rows: | `key` | `default` | meaning |."""
    rows = re.findall(r"^\| `([^`]+)` \| `([^`]*)` \|", open(DOC).read(), flags=re.MULTILINE)
    return dict(rows)


def test_every_config_key_is_documented_with_its_default():
    documented = documented_defaults()
    keys = dict(config_keys(RootConfig))
    assert len(keys) > 100  # the walk reaches the nested sections
    missing = sorted(set(keys) - set(documented))
    assert not missing, f"docs/configuration.md lacks these config keys: {missing}"
    wrong = {k: (documented[k], as_yaml(v)) for k, v in keys.items() if documented[k] != as_yaml(v)}
    assert not wrong, f"documented default != config.py default (doc, code): {wrong}"
    stale = sorted(set(documented) - set(keys))
    assert not stale, f"docs/configuration.md documents keys the config does not have: {stale}"
