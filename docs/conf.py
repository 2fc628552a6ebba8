"""Sphinx configuration for numpyro_iwae."""

project = "numpyro_iwae"
author = "numpyro_iwae developers"
copyright = "2026, numpyro_iwae developers"
release = "0.1.0"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
napoleon_google_docstring = True
napoleon_use_ivar = True  # NamedTuple fields are documented once, in their class
napoleon_numpy_docstring = False
exclude_patterns = ["_build"]
html_theme = "alabaster"
html_static_path: list[str] = []
suppress_warnings = ["config.cache"]
