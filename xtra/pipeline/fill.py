"""Write every key the schema defines into a params file, keeping its comments and layout.

Why: DVC compares only what params.yaml spells out. A value the schema fills in at run time is
seen by the command but by no DVC dependency, and `dvc exp run -S KEY=...` refuses a key the file
does not hold ("Key ... is not in struct"). So the shipped params files (params.yaml and
profiles/*.yaml) hold every key, and `xtra profile --fill` re-writes them after the schema gained
a key or a section gained a minimal entry. The value given is the one the command would use: for an
entry of a named section (a dataset, model, benchmark), the value the file's other entries of that
section give (`xtra.config.profile_defaults`: a demo benchmark gets the demo's epochs, batch and
grid), else the schema default. A key already present is never changed.

A key that a mapping receives through a YAML merge key (`<<: *demo_arch`) counts as present; new
keys go after the mapping's last key, and a comment block that followed that key (the lead-in
of the next section) stays where it was.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.tokens import CommentToken

from xtra.atomic import write_atomic
from xtra.config import load_schema, profile_defaults
from xtra.errors import ParamsError
from xtra.yamlio import read_yaml, represent_float

__all__ = ["fill_text", "fill_file", "missing_keys"]


def _yaml() -> YAML:
    y = YAML()
    y.preserve_quotes = True
    y.width = 4096
    y.indent(mapping=2, sequence=4, offset=2)
    y.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    y.representer.add_representer(float, represent_float)
    return y


def _resolve(schema: dict[str, Any]) -> dict[str, Any]:
    """A schema node with its local `$ref` followed (the referring node's keys win)."""
    if "$ref" not in schema:
        return schema
    target: Any = load_schema()
    for part in schema["$ref"].removeprefix("#/").split("/"):
        target = target[part]
    return {**_resolve(target), **{k: v for k, v in schema.items() if k != "$ref"}}


def _flow(value: Any) -> Any:
    """A default as a ruamel node: small mappings and lists in flow style (`{a: 1}`, `[0.9, 0.95]`)."""
    if isinstance(value, dict):
        node = CommentedMap((k, _flow(v)) for k, v in value.items())
        if len(value) <= 6:
            node.fa.set_flow_style()
        return node
    if isinstance(value, list):
        seq = CommentedSeq(_flow(v) for v in value)
        seq.fa.set_flow_style()
        return seq
    return value


def _merged_has(node: CommentedMap, key: str) -> bool:
    for source in getattr(node, "merge", None) or []:
        source = source[1] if isinstance(source, tuple) else source
        if key in source:
            return True
    return False


def _append(node: CommentedMap, key: str, value: Any) -> None:
    """Add `key` after the last key, leaving the last key's trailing comment lines below it."""
    own = [k for k in node if k in getattr(node, "_ok", node)]
    last = own[-1] if own else None
    node[key] = value
    slot = node.ca.items.get(last) if last is not None else None
    token = slot[2] if slot and len(slot) > 2 else None
    if token is None or "\n" not in token.value:
        return
    first, rest = token.value.split("\n", 1)
    if not rest:
        return
    if first.strip():
        token.value = first + "\n"
    else:
        slot[2] = None
    node.ca.items[key] = [None, None, CommentToken("\n" + rest, token.start_mark, None), None]


def _fill(node: Any, schema: dict[str, Any], where: str, added: list[str], profile: dict[str, Any]) -> None:
    schema = _resolve(schema)
    if not isinstance(node, dict):
        return
    children = []
    for name, sub in schema.get("properties", {}).items():
        sub = _resolve(sub)
        if name not in node and not _merged_has(node, name) and "default" in sub:
            value = profile.get(f"{where}{name}", sub["default"])  # the file's own entries first
            _append(node, name, _flow(json.loads(json.dumps(value))))
            added.append(f"{where}{name}")
        if name in node and name in getattr(node, "_ok", node):
            children.append((name, sub))
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        children += [(name, extra) for name in node]
    for name, sub in children:
        _fill(node[name], sub, f"{where}{name}.", added, profile)
        if isinstance(node[name], CommentedMap) and len(node[name]) > 6 and node[name].fa.flow_style():
            node[name].fa.set_block_style()  # a filled-in flow mapping `{dataset: d, eval_split: test}`


def fill_text(text: str, source: str = "params.yaml") -> tuple[str, list[str]]:
    """`text` with every missing schema key written in, and the dotted keys added. A key that an entry
    of a named section leaves out gets the value the section's other entries give it
    (`xtra.config.profile_defaults`: the active profile's), else the schema's default."""
    y = _yaml()
    try:
        data = y.load(text)
    except Exception as exc:  # ruamel raises many kinds; all mean "not YAML we can edit"
        raise ParamsError(f"{source}: cannot parse for filling: {exc}") from exc
    added: list[str] = []
    _fill(data, load_schema(), "", added, profile_defaults(read_yaml(text, source)))
    if not added:
        return text, []
    out = io.StringIO()
    y.dump(data, out)
    return out.getvalue(), added


def fill_file(path: str | Path) -> list[str]:
    """Fill `path` in place (atomically); the keys added."""
    path = Path(path)
    text, added = fill_text(path.read_text(), str(path))
    if added:
        write_atomic(path, text)
    return added


def missing_keys(text: str) -> list[str]:
    """The schema keys a params text leaves to defaults."""
    return fill_text(text)[1]
