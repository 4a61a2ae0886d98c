"""Fixtures for the rollout tests; helpers live in rollout_testlib (which also sets up ``sys.path``)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import rollout_testlib  # noqa: E402,F401  (puts operator/ and tests/operator/ on sys.path)
