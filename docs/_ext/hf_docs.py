"""Sphinx helpers for hessianflow's documentation, generated from the code rather than retyped.

- ``api_pages``: one page per name in ``hessianflow.__all__``, grouped by the comments of ``__all__``
  in ``hessianflow/__init__.py``, and an index of the groups (``docs/api/``, written before reading).
- ``hf-argparse``: a directive that imports a script's parser builder (``module:function``) and renders
  every flag (names, type, default, choices, help) as a table, so the flags cannot drift from the code.
- ``FigureScraper``: a sphinx-gallery image scraper for ``matplotlib.figure.Figure`` objects made without
  pyplot (hessianflow.plotting's ``return_fig=True``), which the default matplotlib scraper cannot see.
"""

from __future__ import annotations

import argparse
import importlib
import re
from pathlib import Path

from docutils import nodes
from sphinx.util.docutils import SphinxDirective

# -- the API pages -------------------------------------------------------------------------------------


def public_groups(init_file: Path) -> list[tuple[str, list[str]]]:
    """``[(group title, [names])]`` from the ``# comment`` lines that divide ``__all__``."""
    text = init_file.read_text()
    block = re.search(r"__all__ = \[(.*?)\n\]", text, flags=re.S).group(1)
    groups: list[tuple[str, list[str]]] = [("Version", [])]
    for line in block.splitlines():
        line = line.strip()
        if line.startswith("#"):
            title = line.lstrip("# ").strip()
            groups.append((title[0].upper() + title[1:], []))
        elif line.startswith('"'):
            groups[-1][1].append(line.strip('",'))
    return [(title, names) for title, names in groups if names]


def _directive(obj) -> str:
    if isinstance(obj, type):
        return "autoexception" if issubclass(obj, BaseException) else "autoclass"
    return "autofunction" if callable(obj) else "autodata"


def write_api_pages(app) -> None:
    """Write ``docs/api/index.rst`` and one page per public name (only files whose text changed)."""
    import hessianflow

    root = Path(app.srcdir)
    out = root / "api"
    out.mkdir(exist_ok=True)
    groups = public_groups(Path(hessianflow.__file__))
    listed = [n for _, names in groups for n in names]
    if sorted(listed) != sorted(hessianflow.__all__):
        raise RuntimeError(f"__all__ and its groups differ: {sorted(set(listed) ^ set(hessianflow.__all__))}")

    def write(path: Path, text: str) -> None:
        if not path.exists() or path.read_text() != text:
            path.write_text(text)

    lines = [
        "API reference",
        "=============",
        "",
        f"The {len(listed)} names of ``hessianflow.__all__`` (``import hessianflow as hf``), grouped as in",
        "``hessianflow/__init__.py``; everything else is importable from its subpackage (``hessianflow.curvature``,",
        "``hessianflow.linalg``, ``hessianflow.training``, ``hessianflow.io``, ``hessianflow.plotting``,",
        "``hessianflow.distributed``, ``hessianflow.compat``, ``hessianflow.cli``). Each page is generated from",
        "the docstring, with the signature and the example that the doctests run.",
        "",
    ]
    for title, names in groups:
        lines += [title, "-" * len(title), "", ".. toctree::", "   :maxdepth: 1", ""]
        lines += [f"   hf.{name}" for name in names]
        lines.append("")
        for name in names:
            obj = getattr(hessianflow, name)
            heading = f"hf.{name}"
            page = [heading, "=" * len(heading), "", ".. currentmodule:: hessianflow", ""]
            if name == "__version__":
                page += [".. data:: __version__", "", f"   The installed version, ``{obj!r}``.", ""]
            else:
                page += [f".. {_directive(obj)}:: {name}"]
                if isinstance(obj, type) and not issubclass(obj, BaseException):
                    page += ["   :members:", "   :inherited-members:", "   :show-inheritance:"]
                page.append("")
            write(out / f"hf.{name}.rst", "\n".join(page))
    write(out / "index.rst", "\n".join(lines))


# -- the scripts' flags --------------------------------------------------------------------------------


def _type_name(action: argparse.Action) -> str:
    if action.nargs == 0:
        return "switch"
    t = action.type
    name = getattr(t, "__name__", None) or type(t).__name__ if t is not None else "str"
    if action.nargs in ("+", "*"):
        name = f"{name} ..."
    return name


def _default(action: argparse.Action) -> str:
    d = action.default
    if d is None or d is argparse.SUPPRESS or action.nargs == 0 and d is False:
        return ""
    if isinstance(d, (list, tuple)):
        return " ".join(str(v) for v in d)
    return str(d)


def _paragraph(*parts) -> nodes.paragraph:
    """A paragraph of plain strings and ``("code", text)`` literals."""
    para = nodes.paragraph()
    for part in parts:
        para += nodes.literal(part[1], part[1]) if isinstance(part, tuple) else nodes.Text(part)
    return para


def flag_rows(parser: argparse.ArgumentParser) -> list[tuple]:
    """``(flags, type, default, help)`` of every action but ``--help``, help strings %-formatted as argparse does."""
    rows = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue
        flags = action.option_strings or [action.dest]
        help_text = " ".join((action.help or "").split())
        if "%(" in help_text:
            help_text = help_text % {**vars(action), "prog": parser.prog}
        if action.choices is not None:
            help_text += " (choices: " + ", ".join(str(c) for c in action.choices) + ")"
        rows.append((flags, _type_name(action), _default(action), help_text))
    return rows


def flag_table(rows: list[tuple]) -> nodes.table:
    """A four-column docutils table (flag, type, default, what it does): built as nodes, so that it renders
    the same from a Markdown (myst) page and from an rst one."""
    table = nodes.table(classes=["hf-flags"])
    group = nodes.tgroup(cols=4)
    table += group
    for width in (22, 10, 14, 54):
        group += nodes.colspec(colwidth=width)

    def row(cells) -> nodes.row:
        r = nodes.row()
        for cell in cells:
            entry = nodes.entry()
            entry += cell
            r += entry
        return r

    head = nodes.thead()
    head += row([_paragraph(h) for h in ("flag", "type", "default", "what it does")])
    body = nodes.tbody()
    for flags, type_name, default, help_text in rows:
        names = []
        for k, flag in enumerate(flags):
            names += ([", "] if k else []) + [("code", flag)]
        body += row([_paragraph(*names), _paragraph(type_name), _paragraph(("code", default)) if default else
                     _paragraph(""), _paragraph(help_text)])  # fmt: skip
    group += head
    group += body
    return table


class ArgparseFlags(SphinxDirective):
    """``hf-argparse:: package.module:builder``: a table of every flag of ``builder()``'s parser."""

    required_arguments = 1
    has_content = False

    def run(self):
        module_name, func_name = self.arguments[0].split(":")
        module = importlib.import_module(module_name)
        self.env.note_dependency(module.__file__)
        return [flag_table(flag_rows(getattr(module, func_name)()))]


# -- docstrings as napoleon reads them -----------------------------------------------------------------


def join_section_headers(app, what, name, obj, options, lines) -> None:
    """Make the library's docstrings readable by napoleon without changing them for ``help()``.

    Two habits of the docstrings that napoleon does not parse: an ``Example (...):`` header whose
    parenthesis runs over two lines (joined into one line here, so it is read as the section header it is),
    and ``**options`` at the end of a parameter line that lists several names (escaped, so that it is not
    read as the start of bold text).
    """
    i = 0
    while i < len(lines):
        line = lines[i]
        if re.match(r"\s*Examples? \(", line) and not line.rstrip().endswith(":"):
            j = i + 1
            while j < len(lines) and not lines[j - 1].rstrip().endswith("):"):
                j += 1
            lines[i : j] = [line.rstrip() + " " + " ".join(x.strip() for x in lines[i + 1 : j])]
        lines[i] = re.sub(r"(?<=, )\*\*(\w+):", r"\\*\\*\1:", lines[i])
        i += 1


# -- figures made without pyplot -----------------------------------------------------------------------


class FigureScraper:
    """Save every new ``matplotlib.figure.Figure`` found in the example's globals after a code block."""

    def __repr__(self):  # sphinx-gallery caches the configuration by its repr
        return "FigureScraper"

    def __call__(self, block, block_vars, gallery_conf):
        from matplotlib.figure import Figure
        from sphinx_gallery.scrapers import figure_rst

        figures = [v for v in block_vars["example_globals"].values() if isinstance(v, Figure)]
        paths = []
        image_paths = block_vars["image_path_iterator"]
        for fig in figures:
            if getattr(fig, "_hf_docs_scraped", False):
                continue
            fig._hf_docs_scraped = True
            path = next(image_paths)
            fig.savefig(path, dpi=110)
            paths.append(path)
        return figure_rst(paths, gallery_conf["src_dir"])


def setup(app):
    app.connect("builder-inited", write_api_pages)
    app.connect("autodoc-process-docstring", join_section_headers, priority=400)  # before napoleon (500)
    app.add_directive("hf-argparse", ArgparseFlags)
    return {"parallel_read_safe": True, "parallel_write_safe": True}


