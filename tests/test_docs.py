"""The generated reference pages in docs/ match the code (regenerate with `python -m fedtreelora.docgen docs/`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedtreelora.config import config_reference
from fedtreelora.docgen import methods_reference

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.mark.parametrize(
    ("page", "generate"), [("configuration.md", config_reference), ("methods.md", methods_reference)]
)
def test_generated_page_is_current(page: str, generate) -> None:  # type: ignore[no-untyped-def]
    assert (DOCS / page).read_text() == generate(), f"docs/{page} is stale: run `python -m fedtreelora.docgen docs/`"


def test_every_method_documents_what_is_shared_local_and_frozen() -> None:
    text = methods_reference()
    from fedtreelora.strategies import STRATEGIES

    for name, cls in STRATEGIES.items():
        assert f"## `{name}`" in text
        doc = (cls.__doc__ or "").lower()
        assert cls.paper, f"{name} names no paper"
        for word in ("shared", "local", "frozen", "wire"):
            assert word in doc, f"{name}'s docstring does not say what is {word}"


@pytest.mark.parametrize(
    "path", sorted((DOCS.parent / "examples").glob("*.yaml")) + [DOCS.parent / "configs" / "default.yaml"]
)
def test_example_configs_validate(path: Path) -> None:
    from fedtreelora.config import load_config

    config = load_config(path)
    assert config.method in ("fedtreelora", "fedit", "local", "ffa", "fedsa", "feddpa", "fedalt", "fedlease")


def test_default_yaml_is_the_built_in_default() -> None:
    from fedtreelora.config import dump_config, load_config

    assert (DOCS.parent / "configs" / "default.yaml").read_text() == dump_config(load_config()), (
        "configs/default.yaml is stale: run `python -m fedtreelora.docgen docs/`"
    )


def test_docgen_writes_the_default_yaml(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from fedtreelora.docgen import write_default_config

    written = write_default_config(tmp_path / "configs" / "default.yaml")
    assert written.read_text() == (DOCS.parent / "configs" / "default.yaml").read_text()
