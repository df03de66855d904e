"""The reference of every config key for `persrec train --help`: type, default and the comment above its field.

The comments next to the defaults in `persrec.config` are the one documentation of the keys; this module reads
them from the source rather than keeping a second copy that would drift.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import textwrap
from dataclasses import dataclass
from typing import Any

from persrec.config import (
    Config,
    OptimArgs,
    _fields,
    _type_name,
)

_SECTION_MARK = re.compile(r"#\s*-{2,}\s*(.+?)\s*-{2,}$")


@dataclass(frozen=True)
class KeyHelp:
    """One line of `persrec train --help`: a key, its section, type, default and documentation."""

    key: str
    section: str
    type: str
    default: Any
    doc: str


def _comment_docs(cls: type) -> dict[str, tuple[str, str]]:
    """Field name -> (section, doc), read from the comments above each field in the class's source.

    The comments next to the defaults are the documentation, so `--help` reads them rather than a copy. A
    comment documents the field below it and the fields that follow with no line in between (`hstu_qk_dim`,
    `hstu_v_dim`); a `# ---- name ----` line opens a section.
    """
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source shipped: keys and defaults are still listed
        return {}
    node = ast.parse(source).body[0]
    assert isinstance(node, ast.ClassDef)
    lines = source.splitlines()
    docs: dict[str, tuple[str, str]] = {}
    section, doc, previous_end = "", "", node.lineno
    for item in node.body:
        between = lines[previous_end : item.lineno - 1]
        previous_end = item.end_lineno or item.lineno
        if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
            continue
        comments: list[str] = []
        for line in between:
            text = line.strip()
            if mark := _SECTION_MARK.fullmatch(text):
                section, comments = mark.group(1), []
            elif text.startswith("#"):
                comments.append(text.lstrip("#").strip())
            else:
                comments = []
        if between:
            doc = " ".join(comments)
        docs[item.target.id] = (section, doc)
    return docs


def config_reference(base: Config | None = None) -> list[KeyHelp]:
    """Every key in declaration order with its section, type, value in `base` (default: the defaults) and doc."""
    base = Config() if base is None else base
    top = _comment_docs(Config)
    rows: list[KeyHelp] = []
    for name, annotation in _fields(Config).items():
        section, doc = top.get(name, ("", ""))
        if dataclasses.is_dataclass(annotation):
            inner_docs = _comment_docs(annotation)
            title = f"optimiser ({name}.*)" if annotation is OptimArgs else name
            for inner, inner_type in _fields(annotation).items():
                value = getattr(getattr(base, name), inner)
                inner_doc = inner_docs.get(inner, ("", ""))[1]
                rows.append(KeyHelp(f"{name}.{inner}", title, _type_name(inner_type), value, inner_doc))
            continue
        rows.append(KeyHelp(name, section, _type_name(annotation), getattr(base, name), doc))
    return rows
