"""Reference pages generated from the code itself, so they cannot drift: the configuration keys
(from the schema) and the methods (from each strategy's docstring).

    python -m fedtreelora.docgen docs/      # rewrite docs/configuration.md, docs/methods.md and
                                            # configs/default.yaml (the built-in defaults)
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

from fedtreelora.config import config_reference, dump_config, load_config
from fedtreelora.strategies import STRATEGIES, table_order


def methods_reference() -> str:
    """Markdown: one section per registered method with its paper, docstring and options."""
    names = table_order(list(STRATEGIES))
    lines = [
        "# Methods",
        "",
        "Generated from each strategy's docstring (`python -m fedtreelora.docgen docs/`). Run one with",
        "`fedtreelora run --method NAME`; its options are the config section of the same name",
        "(see [configuration.md](configuration.md)).",
        "",
    ]
    for name in names:
        cls = STRATEGIES[name]
        lines += [f"## `{name}`", "", f"*{cls.paper}*", "", inspect.cleandoc(cls.__doc__ or ""), ""]
        fields = cls.Options.model_fields
        if fields:
            lines += ["| option | default | meaning |", "|---|---|---|"]
            for key, field in fields.items():
                doc = (field.description or "").replace("\n", " ").replace("|", "\\|")
                lines.append(f"| `{name}.{key}` | `{field.get_default(call_default_factory=True)!r}` | {doc} |")
            lines.append("")
    return "\n".join(lines)


def write_docs(folder: str | Path) -> list[Path]:
    """Write ``configuration.md`` and ``methods.md`` into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pages = {"configuration.md": config_reference(), "methods.md": methods_reference()}
    for name, text in pages.items():
        (folder / name).write_text(text)
    return [folder / name for name in pages]


def write_default_config(path: str | Path) -> Path:
    """Write the built-in default experiment as YAML (``configs/default.yaml``: every option, its default)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_config(load_config()))
    return path


if __name__ == "__main__":
    # python -m fedtreelora.docgen [DOCS]: the reference pages into DOCS (default docs/) and, in a source
    # checkout, configs/default.yaml beside it
    docs = Path(sys.argv[1] if len(sys.argv) > 1 else "docs")
    for path in write_docs(docs):
        print(path)
    if (docs.resolve().parent / "configs").is_dir():
        print(write_default_config(docs.resolve().parent / "configs" / "default.yaml"))
