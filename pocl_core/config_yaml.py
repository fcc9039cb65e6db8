"""The YAML dialect of config files and override values.

``yaml.safe_load`` plus: a key given twice in one mapping is an error, numbers are read as in YAML 1.2
(``1e-4`` a float, ``010`` decimal 10, ``1:30`` text), and ``unshared`` gives each place of a YAML
alias its own copy, so an override of one place leaves the others alone.
"""

from __future__ import annotations

import re
from typing import Any

import yaml


def unshared(value: Any, inside: tuple[int, ...] = ()) -> Any:
    """A copy of a YAML tree in which no mapping or list appears twice (a YAML alias shares one object
    between its places; an override of one place must not change the others). ValueError for an alias
    that contains itself (``seeds: &s [1, *s]``), which no setting can hold."""
    if isinstance(value, (dict, list)):
        if id(value) in inside:
            raise ValueError("a YAML alias refers to a mapping or list that contains it (e.g. `&s [1, *s]`)")
        inside = (*inside, id(value))
    if isinstance(value, dict):
        return {k: unshared(v, inside) for k, v in value.items()}
    if isinstance(value, list):
        return [unshared(v, inside) for v in value]
    return value


class _ConfigLoader(yaml.SafeLoader):
    """yaml.safe_load, plus: a key given twice in one mapping is an error (YAML keeps the last
    silently), and numbers read as in YAML 1.2: ``1e-4`` is a float (YAML 1.1 needs a dot:
    ``1.0e-4``) and integers are decimal (``010`` is 10, not YAML 1.1's octal 8; ``1:30`` is text, not
    base-60 90), hexadecimal ``0x1f`` or octal ``0o17``."""

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        text = str(self.construct_scalar(node)).replace("_", "")
        sign = -1 if text.startswith("-") else 1
        digits = text.lstrip("+-")
        if digits[:2] in ("0x", "0o"):
            return sign * int(digits[2:], 16 if digits[1] == "x" else 8)
        return sign * int(digits, 10)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: merged keys may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:
                raise yaml.constructor.ConstructorError(None, None, f"a key must be a plain value, not a {type(key).__name__}",
                                                        key_node.start_mark) from None
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"key '{key}' appears twice in one section",
                                                        key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


_ConfigLoader.yaml_implicit_resolvers = {  # drop YAML 1.1's int rule (octal 010, base-60 1:30, 0b1)
    first: [(tag, rule) for tag, rule in rules if tag != "tag:yaml.org,2002:int"]
    for first, rules in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?[0-9][0-9_]*|0x[0-9a-fA-F_]+|0o[0-7_]+)$"), list("-+0123456789"))
_ConfigLoader.add_constructor("tag:yaml.org,2002:int", _ConfigLoader.construct_yaml_int)
_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def read_yaml(text: str) -> Any:
    """``text`` read as YAML in this dialect (``yaml.YAMLError`` when it is not YAML)."""
    return yaml.load(text, Loader=_ConfigLoader)
