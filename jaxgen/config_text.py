"""Config text to plain data: bounded YAML and dotted `key=value` overrides.

Pure functions that run before any schema: a config file or override becomes
nested dicts, and anything that is not valid YAML, or would expand into far more
values than a config holds (YAML alias bombs), is refused in one line naming
where it came from. `jaxgen.config` validates the result.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from jaxgen.errors import ConfigError


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["train.steps=50", "mesh.fsdp=4"]` -> nested dict; values are parsed as YAML."""
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} is not of the form section.key=value (e.g. train.steps=50)")
        value = load_yaml(raw, f"override {excerpt(item)}") if raw else ""
        *parents, leaf = key.split(".")
        node = nested
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of {part!r}")
            node = child
        node[leaf] = value
    return nested


# A config is a few kB; YAML aliases can make a small file expand into billions of values.
MAX_CONFIG_BYTES = 1_000_000
MAX_CONFIG_VALUES = 100_000


class _KeyProblem(yaml.YAMLError):
    """Valid YAML with a key no config can hold; the message names its line."""


class _RepeatedKey(_KeyProblem):
    def __init__(self, key: Any, line: int):
        super().__init__(f"line {line}: key {key!r} is given twice in one mapping; keep one")


class _UniqueKeyLoader(yaml.SafeLoader):
    """Safe YAML in which a key written twice in one mapping is an error: PyYAML would keep the last silently."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`, whose keys the mapping may override
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (list, dict)):  # `? [a, b]`: YAML allows it, a dict cannot hold it
                raise _KeyProblem(f"line {key_node.start_mark.line + 1}: key {key!r} is a {type(key).__name__}; a "
                                  "config key is a name")
            if key in seen:
                raise _RepeatedKey(key, key_node.start_mark.line + 1)
            seen.add(key)
        return super().construct_mapping(node, deep)


# Plain scalars are read as YAML 1.2's core schema reads them, not as YAML 1.1, which PyYAML follows: there
# `1e-4` is a string (a float needs a dot and a signed exponent), `010` is 8 (octal), `1:30` is 90 (base 60),
# `1_0` is 10, yes/no/on/off are booleans and 2024-01-31 a date, none of which a user means.
_CORE_SCHEMA = {
    "tag:yaml.org,2002:bool": (r"true|True|TRUE|false|False|FALSE", "tTfF"),
    "tag:yaml.org,2002:int": (r"[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+", "-+0123456789"),
    "tag:yaml.org,2002:float": (r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
                                r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)", "-+0123456789."),
}
_UniqueKeyLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in _CORE_SCHEMA and not tag.endswith(":timestamp")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
for _tag, (_pattern, _first) in _CORE_SCHEMA.items():
    _UniqueKeyLoader.add_implicit_resolver(_tag, re.compile(f"^(?:{_pattern})$"), list(_first))


def _core_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node)
    for prefix, base in (("0o", 8), ("0x", 16)):
        if text.startswith(prefix):
            return int(text[2:], base)
    if len(text.lstrip("+-")) > 1000:  # Python refuses to read ints past 4300 digits; no setting takes 1000
        raise yaml.constructor.ConstructorError(None, None, f"a {len(text.lstrip('+-'))}-digit integer is larger "
                                                "than any setting takes", node.start_mark)
    return int(text, 10)  # `010` is ten


_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", _core_int)


def load_yaml(text: str, where: str) -> Any:
    """Parsed YAML, refused (in one line) if invalid, if a mapping repeats a key, or if its aliases expand
    beyond MAX_CONFIG_VALUES."""
    try:
        value = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except _KeyProblem as err:
        raise ConfigError(f"{where}, {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{where} is not valid YAML: {yaml_problem(err)}") from None
    _count_values(value, where, {}, set())
    return value


def yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's error as a person reads it: 'line 10, column 5: could not find expected ':'' (its own text
    quotes the whole input as "<unicode string>" and repeats the place)."""
    mark, problem = getattr(err, "problem_mark", None), getattr(err, "problem", None)
    if mark is None or not problem:
        return " ".join(str(err).split())
    context = getattr(err, "context", None)
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" + (f" ({context})" if context else "")


def _count_values(value: Any, where: str, sizes: dict[int, int], open_nodes: set[int]) -> int:
    """How many values `value` holds once every alias is expanded (each shared node counted once per use)."""
    if not isinstance(value, (dict, list)):
        return 1
    if id(value) in open_nodes:
        raise ConfigError(f"{where} contains a YAML alias that refers to itself")
    if id(value) not in sizes:
        open_nodes.add(id(value))
        children = list(value.values()) if isinstance(value, dict) else value
        size = 1
        for child in children:
            size += _count_values(child, where, sizes, open_nodes)
            if size > MAX_CONFIG_VALUES:
                raise ConfigError(f"{where} expands to more than {MAX_CONFIG_VALUES:,} values (YAML aliases repeat "
                                  "what they refer to); a config holds far fewer")
        open_nodes.discard(id(value))
        sizes[id(value)] = size
    return sizes[id(value)]


def excerpt(value: Any, limit: int = 80) -> str:
    """repr(value), cut short: an error message names a value, it does not print it all."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 5] + " ...)" if text[:1] in "[{(" else text[: limit - 3] + "..."


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged
