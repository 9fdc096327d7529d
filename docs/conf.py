"""Sphinx configuration: MyST Markdown guides, autodoc reference, warnings are errors."""

from __future__ import annotations

project = "trioban"
author = "the trioban authors"
copyright = "2026, the trioban authors"
extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon"]
source_suffix = {".md": "markdown"}
myst_enable_extensions = ["colon_fence"]
exclude_patterns = ["_build"]
html_theme = "furo"
html_title = "trioban"
autodoc_member_order = "bysource"
autodoc_typehints = "description"
napoleon_google_docstring = True
napoleon_use_ivar = True  # "Attributes:" as fields, not duplicate object descriptions
nitpicky = False
