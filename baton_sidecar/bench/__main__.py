"""``python -m baton_sidecar.bench`` (the same as ``baton-sidecar bench``)."""

import sys

from .cli import main

sys.exit(main())
