"""Entry point for ``kopf run operator/baton_operator/main.py`` (file form of ``kopf run -m baton_operator``)."""

import pathlib
import sys

if __package__ in (None, ""):  # loaded by path: make the package importable by its name
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import baton_operator  # noqa: E402,F401  (importing registers the handlers)
