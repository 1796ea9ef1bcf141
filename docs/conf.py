"""Sphinx configuration of seqpar's documentation (``python -m sphinx -W -b html docs docs/_build/html``)."""
from __future__ import annotations

import os
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)                                  # this checkout's seqpar, not an installed one
sys.path.insert(0, os.path.join(ROOT, "docs", "_ext"))   # seqpar_api, the API page's directive

# Load the MPI library without initialising it: building the docs is no MPI job, and
# `import seqpar` needs mpi4py's MPI module only for its names.
import mpi4py

mpi4py.rc.initialize = False
mpi4py.rc.finalize = False

import seqpar

project = "seqpar"
author = "The seqpar developers"
copyright = "the seqpar developers"
release = version = seqpar.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "numpydoc",
    "seqpar_api",
]

# seqpar imports CuPy only inside functions that run on the GPU; mocking keeps the build
# independent of any GPU package should that ever change.
autodoc_mock_imports = ["cupy", "cupyx", "ml_dtypes"]
autodoc_member_order = "bysource"
# signatures as the README writes them, (q, k, v, *, causal=False, ...): the numpydoc
# Parameters sections give the types, shapes and dtypes
autodoc_typehints = "none"
autodoc_preserve_defaults = True
numpydoc_show_class_members = False    # the class's members are documented by :members:
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False

# every cross-reference must resolve: a guide page naming a function seqpar lacks fails
nitpicky = True

exclude_patterns = ["_build"]
html_theme = "alabaster"
html_static_path: list[str] = []
html_theme_options = {"description": "Exact attention over sequences split across MPI ranks",
                      "fixed_sidebar": False}
