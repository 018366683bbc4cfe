"""YAML and JSON loading that rejects duplicate keys.

PyYAML and json keep the last of two equal keys without a word; in a manifest that
silently drops a setting (a second `resources:` wins over the first), so here it is an error.
YAML merge keys (``<<: *anchor``) may still be overridden: only keys written out twice count.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml


class DuplicateKeyError(ValueError):
    pass


class _StrictLoader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False):
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise DuplicateKeyError(f"duplicate key {key!r} at line {key_node.start_mark.line + 1} "
                                    f"(first at line {seen[key].start_mark.line + 1})")
        seen[key] = key_node
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml_documents(path: Path) -> list[Any]:
    """All non-empty documents of a YAML file."""
    with open(path, encoding="utf-8") as fh:
        return [doc for doc in yaml.load_all(fh, Loader=_StrictLoader) if doc is not None]


def load_json(path: Path) -> Any:
    def pairs(items):
        keys = [k for k, _ in items]
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        if dupes:
            raise DuplicateKeyError(f"duplicate key(s) {', '.join(map(repr, dupes))}")
        return dict(items)

    with open(path, encoding="utf-8") as fh:
        return json.load(fh, object_pairs_hook=pairs)
