"""Sphinx configuration: API pages from the docstrings, a gallery executed at build time, Markdown pages.

Build with ``bash .ci/build_docs`` (warnings are errors, then a headless-browser check), or
``python -m sphinx -W --keep-going -b html docs docs/_build/html`` after ``pip install -e ".[docs]"``.
"""

import os
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))  # this checkout's hessianflow, and the examples' imports of utils/models
sys.path.insert(0, str(DOCS / "_ext"))
# the gallery scripts import the scripts beside them (as when run from their directory), and
# docs/howto/huggingface.md renders examples/transformer_spectrum.py's flags
sys.path[:0] = [str(ROOT / "examples"), str(ROOT / "experiments")]
os.environ.setdefault("MPLBACKEND", "Agg")

from hf_docs import FigureScraper  # noqa: E402

import hessianflow  # noqa: E402

project = "hessianflow"
author = "the hessianflow authors"
copyright = "the hessianflow authors, MIT licence"
release = version = hessianflow.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinx_gallery.gen_gallery",
    "myst_parser",
    "hf_docs",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
# benchmarks/README.md (included as is, edited by everyone) jumps heading levels in places
suppress_warnings = ["myst.header"]
myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3

# -- autodoc: signatures from the code, Google-style docstrings ------------------------------------------
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_class_signature = "mixed"  # the class line shows __init__'s parameters
autodoc_default_options = {"exclude-members": "__init__, __new__"}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True  # a dataclass's "Attributes:" as fields: :members: documents the attributes once

# -- the gallery: examples/plot_*.py and experiments/plot_*.py, executed on small CPU settings ------------
sphinx_gallery_conf = {
    "examples_dirs": [str(ROOT / "examples"), str(ROOT / "experiments")],
    "gallery_dirs": ["auto_examples", "auto_experiments"],
    # executed: plot_*.py, except FSDP2 examples (they need torchrun and several ranks)
    "filename_pattern": r"/plot_(?!fsdp_)",
    # listed: only plot_*.py; the other scripts are command lines (documented in their docstrings)
    "ignore_pattern": r"^(?!plot_)|fsdp_",  # matched against the file name
    "image_scrapers": ("matplotlib", FigureScraper()),
    "within_subsection_order": "FileNameSortKey",
    "download_all_examples": False,
    "show_memory": False,
    "remove_config_comments": True,
    "min_reported_time": 1,
}

# -- HTML -----------------------------------------------------------------------------------------------
smartquotes = False  # flags stay --flag, not an en dash
html_theme = "furo"
html_title = f"hessianflow {release}"
html_static_path = []
