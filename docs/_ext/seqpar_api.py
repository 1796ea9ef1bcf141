"""The API page's directive: every name in ``seqpar.__all__``, documented by autodoc.

``.. seqpar-api::`` expands to an autosummary table and one autodoc entry per public
name, grouped by :func:`group`, so a name added to ``seqpar.__all__`` appears without
editing the docs. After reading, every public name must be a documented object of the
Python domain; a missing one is a warning, which ``-W`` turns into a failed build.
"""
from __future__ import annotations

import inspect

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

import seqpar

logger = logging.getLogger(__name__)

GROUPS = ("Attention", "Backward", "Choosing a strategy", "Placing data and devices",
          "Decoding with a cache", "Plans for repeated calls", "Logging")
_PLACING = {"shard", "gather", "local_indices", "use_local_device"}


def group(name: str) -> str:
    """The section of the API page that documents ``seqpar.<name>``."""
    obj = getattr(seqpar, name)
    if name == "log_to_stderr":
        return "Logging"
    if name.endswith("Plan"):
        return "Plans for repeated calls"
    if inspect.isclass(obj):
        return "Decoding with a cache"
    if name.endswith("_backward"):
        return "Backward"
    if name in _PLACING:
        return "Placing data and devices"
    if name.startswith("choose_"):
        return "Choosing a strategy"
    return "Attention"


class SeqparAPI(SphinxDirective):
    """Autodoc entries for every name in ``seqpar.__all__``."""

    has_content = False

    def run(self):
        names = list(seqpar.__all__)
        lines = [".. currentmodule:: seqpar", "", ".. autosummary::", ""]
        lines += [f"   {name}" for name in names]
        for title in GROUPS:
            members = [name for name in names if group(name) == title]
            if not members:
                continue
            lines += ["", title, "-" * len(title), ""]
            for name in members:
                if inspect.isclass(getattr(seqpar, name)):
                    lines += [f".. autoclass:: {name}", "   :members:", ""]
                else:
                    lines += [f".. autofunction:: {name}", ""]
        source = self.get_source_info()[0]
        content = StringList(lines, source=source)
        container = nodes.section()
        container.document = self.state.document
        nested_parse_with_titles(self.state, content, container)
        return container.children


def check_documented(app, env):
    """Warn (an error under ``-W``) for each public name the docs do not document."""
    objects = env.get_domain("py").objects
    for name in seqpar.__all__:
        if f"seqpar.{name}" not in objects:
            logger.warning("seqpar.%s is in seqpar.__all__ but not documented "
                           "(the API page must use the seqpar-api directive)", name,
                           type="seqpar", subtype="api")


def setup(app):
    app.setup_extension("sphinx.ext.autosummary")
    app.add_directive("seqpar-api", SeqparAPI)
    app.connect("env-check-consistency", check_documented)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
