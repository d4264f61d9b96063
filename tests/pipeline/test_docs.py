"""The documentation stays true: docs/params.md is the schema's (generated), docs/ARCHITECTURE.md names
only modules and functions that exist, the README is a front door (short, its links resolve, the
results markers the report fills), and every section the README once held lives in a guide."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from functools import lru_cache

import pytest

import xtra
from tests.conftest import REPO
from xtra.pipeline.params_doc import PARAMS_DOC, render_params_doc

GUIDES = ["pretraining.md", "data.md", "probing.md", "pipeline.md", "testing.md", "extending.md"]
# the sections of the README before it became a front door (799 lines), each now in a guide
MOVED_SECTIONS = [
    "The method as implemented",
    "Pre-training (`xtra pretrain MODEL`)",
    "Which keys define a run",
    "What resume guarantees",
    "Slurm and LSF: job time limits and resubmission",
    "The paper's two models",
    "Datasets (`xtra prepare DATASET`)",
    "Reading prepared data: streaming for pre-training, random access for small sets",
    "Probing (`xtra probe MODEL`)",
    "Probe settings: the release's recipe",
    "Probing cost of the H/14 protocol",
    "Report (`xtra report`)",
    "params.yaml",
    "What re-runs: one staleness rule for DVC and Snakemake",
    "Cluster runs (Snakemake)",
    "On a Slurm or LSF cluster, step by step",
    "What the test suite proves on a real scheduler",
    "Ablations",
    "Interruptions and faults: what is guaranteed",
    "Benchmarks",
]


def test_params_doc_is_the_schema_s():
    """docs/params.md is what `xtra dag --params-doc` writes from the schema; run it after a schema edit."""
    assert (REPO / PARAMS_DOC).read_text() == render_params_doc(), (
        "docs/params.md is stale: run `xtra dag --params-doc`"
    )
    assert "| `num_heads` |" in render_params_doc() and "## `probe.kinds.attentive`" in render_params_doc()


@lru_cache(maxsize=1)
def _defined() -> set[str]:
    """Every name a module of the package defines (functions, classes, constants) and every module."""
    names = set()
    for info in pkgutil.walk_packages(xtra.__path__, "xtra."):
        module = importlib.import_module(info.name)
        names.add(info.name)
        names |= {n for n, v in vars(module).items() if getattr(v, "__module__", info.name) == info.name or n.isupper()}
        for value in vars(module).values():
            if inspect.isclass(value) and value.__module__ == info.name:
                names |= set(vars(value))
        if module.__file__:  # the attributes its objects set (`self.pixel_heads = ...`)
            names |= set(re.findall(r"self\.(\w+) = ", open(module.__file__).read()))
    return names


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def _spans(text: str) -> list[str]:
    """The backticked spans of a Markdown text outside fenced code blocks."""
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    return re.findall(r"`([^`\n]+)`", prose)


def test_architecture_names_only_what_exists():
    text = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    package = text.split("## The package", 1)[1].split("\n## ", 1)[0]
    wrong = []
    for span in _spans(text):
        if span.startswith("xtra ") or not re.match(r"^[A-Za-z_]", span):
            continue  # a command line, a path or a value
        name = re.match(r"^[\w.]+", span).group(0).rstrip(".")
        if re.fullmatch(r"xtra(\.\w+)+", name):
            ok = _resolves(name)
        elif "." in name:
            continue  # another library's name (torch.load)
        elif span.startswith(f"{name}(") or re.fullmatch(r"[A-Z][a-z]\w*[A-Z]\w*|[A-Z]{2,}[A-Z0-9_]*", name):
            ok = name in _defined()  # a call, a CamelCase class or a CONSTANT
        elif re.fullmatch(r"[a-z]+(_[a-z0-9]+)+", name) and f"`{span}`" in package:
            ok = name in _defined()  # a function or attribute named in the table of modules
        else:
            continue
        if not ok:
            wrong.append(name)
    assert not wrong, f"docs/ARCHITECTURE.md names what does not exist: {sorted(set(wrong))}"
    for path in re.findall(r"`(xtra/[\w/.-]+)`", text):
        assert (REPO / path).exists(), path


def test_readme_is_a_front_door():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 220
    assert "make repro" in text and "make test" in text and "![" in text
    assert text.count("<!-- results:start -->") == 1 and text.count("<!-- results:end -->") == 1
    for target in re.findall(r"\]\(([^)#]+)\)", text):
        assert (REPO / target).exists(), f"README links to {target}, which does not exist"
    for guide in GUIDES:
        assert f"docs/{guide}" in text, guide


@pytest.mark.parametrize("section", MOVED_SECTIONS)
def test_every_section_of_the_old_readme_is_in_a_guide(section: str):
    headings = {guide: re.findall(r"^#{2,3} (.+)$", (REPO / "docs" / guide).read_text(), re.M) for guide in GUIDES}
    assert any(section in found for found in headings.values()), f"no guide has the section {section!r}"
