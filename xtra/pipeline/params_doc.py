"""`docs/params.md`: every key of params.yaml, generated from the schema (`xtra dag --params-doc`).

One table per section of the schema (a mapping of named entries, `datasets.<name>`, is one section
for all of them), a row per key with its type, default and the schema's `description`. A test keeps
the file current: edit the schema, then run `xtra dag --params-doc`.
"""

from __future__ import annotations

import json
from typing import Any

from xtra.config import load_schema

__all__ = ["PARAMS_DOC", "render_params_doc"]

PARAMS_DOC = "docs/params.md"

_HEADER = """\
# params.yaml: every key

Generated from `xtra/schema/params.schema.yaml` by `xtra dag --params-doc` (do not edit; a test
checks that it is current). `params.yaml` spells out every key (`xtra profile --fill`); how the
pipeline uses them: `docs/pipeline.md`. `<name>` stands for a name of your choice (a dataset, a
model, a benchmark, a probe kind of the registry). A renamed key is refused naming its new name.
"""


def _resolve(node: dict[str, Any]) -> dict[str, Any]:
    """A schema node with its local `$ref` followed (the referring node's keys win)."""
    while "$ref" in node:
        target: Any = load_schema()
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
    return node


def _type(node: dict[str, Any]) -> str:
    if "enum" in node:
        return " \\| ".join(f"`{v}`" for v in node["enum"])
    if "oneOf" in node:
        return " or ".join(_type(_resolve(n)) if "const" not in n else f"`{n['const']}`" for n in node["oneOf"])
    kind = node.get("type", "")
    kinds = kind if isinstance(kind, list) else [kind]
    if "array" in kinds:
        return "list of " + _type(_resolve(node.get("items", {})))
    return " or ".join(k for k in kinds if k)


def _cell(text: Any) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _sections(node: dict[str, Any], key: str, out: list[tuple[str, str, list[str]]]) -> None:
    """Append (key, description, rows) of `node` and then of its nested sections, depth first."""
    node = _resolve(node)
    rows, nested = [], []
    for name, sub in node.get("properties", {}).items():
        sub = _resolve(sub)
        if sub.get("type") == "object":
            nested.append((f"{key}.{name}" if key else name, sub))
            continue
        default = f"`{json.dumps(sub['default'])}`" if "default" in sub else "(required)"
        rows.append(f"| `{name}` | {_type(sub)} | {default} | {_cell(sub.get('description', ''))} |")
    extra = node.get("additionalProperties")
    if isinstance(extra, dict):
        nested.append((f"{key}.<name>" if key else "<name>", extra))
    out.append((key, _cell(node.get("description", "")), rows))
    for sub_key, sub in nested:
        _sections(sub, sub_key, out)


def render_params_doc() -> str:
    """The text of docs/params.md."""
    out: list[tuple[str, str, list[str]]] = []
    _sections(load_schema(), "", out)
    parts = [_HEADER]
    for key, description, rows in out:
        if not rows and not description:
            continue
        parts.append(f"\n## `{key}`\n" if key else "\n## top level\n")
        if description:
            parts.append(f"\n{description}\n")
        if rows:
            parts.append("\n| key | type | default | description |\n|---|---|---|---|\n" + "\n".join(rows) + "\n")
    return "".join(parts)
