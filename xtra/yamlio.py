"""YAML as DVC reads it (YAML 1.2, ruamel.yaml's safe loader): the one reading of params files.

PyYAML follows YAML 1.1, where `1e-3` is a string, `yes`/`on` are booleans and `010` is eight; DVC
(ruamel.yaml) follows YAML 1.2, where they are 0.001, strings and ten. Every `xtra` command,
`xtra profile --set`, the check of dvc.yaml and the Snakefile (which replaces Snakemake's own
PyYAML reading) read params with `read_yaml`, so a value means the same to all of them and to
DVC; `dump_yaml` writes text that reads back equal under both versions where it can (floats as
`1.0e-05`) and under YAML 1.2 always (a string that would read as a number is quoted).
"""

from __future__ import annotations

import io
from typing import Any

from ruamel.yaml import YAML, YAMLError
from ruamel.yaml.constructor import SafeConstructor

from xtra.errors import ParamsError

__all__ = ["read_yaml", "dump_yaml", "represent_float"]


class _UniqueKeyConstructor(SafeConstructor):
    """A key given twice in one mapping is refused, naming the key and both lines (a text merge of
    two branches can leave `heldout_fraction` twice; a reader that keeps either one hides it)."""

    def construct_mapping(self, node, deep=False):  # noqa: ANN001 - ruamel's signature
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ParamsError(
                    f"{self.loader.source}: key {key!r} appears twice in one mapping (lines {seen[key]} and {line})"
                )
            seen[key] = line
        return super().construct_mapping(node, deep)


def read_yaml(text: str, source: str = "params.yaml") -> Any:
    """YAML text as DVC reads it: ruamel.yaml's safe loader, YAML 1.2 (`1e-3` is the number 0.001,
    `yes` and `on` are strings, `010` is ten), with merge keys; a key twice in one mapping is an error.

    The one reading of params for every `xtra` command, `xtra profile --set`, the Snakefile and DVC,
    so that a value means the same to each (PyYAML, YAML 1.1, reads `1e-3` as a string)."""
    reader = YAML(typ="safe", pure=True)
    reader.Constructor = _UniqueKeyConstructor
    reader.source = source  # named by the constructor's error (it reaches the YAML object as `loader`)
    try:
        return reader.load(text)
    except YAMLError as exc:
        raise ParamsError(f"{source}: not valid YAML: {exc}") from exc


def represent_float(representer: Any, value: float) -> Any:
    """`1.0e-05`, not `1e-05`: a number to YAML 1.2 and to YAML 1.1 alike (PyYAML, which Snakemake's own
    config reading uses, takes `1e-05` for a string)."""
    text = repr(value)
    if "e" in text and "." not in text.split("e")[0]:
        mantissa, exponent = text.split("e")
        text = f"{mantissa}.0e{exponent}"
    return representer.represent_scalar("tag:yaml.org,2002:float", text)


def dump_yaml(data: Any) -> str:
    """Plain data as YAML 1.2 text that `read_yaml` reads back equal (a string such as `'1e-3'` or
    `'0o10'`, which YAML 1.2 would take for a number, is quoted): small collections in flow style."""
    writer = YAML(typ="safe", pure=True)
    writer.default_flow_style = None
    writer.width = 110
    writer.sort_base_mapping_type_on_output = False
    writer.representer.add_representer(float, represent_float)
    out = io.StringIO()
    writer.dump(data, out)
    return out.getvalue()
