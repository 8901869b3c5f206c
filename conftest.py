"""Keep the repository root off sys.path while the tests run.

The root holds `kernels/`, which the wheel installs as `minivllm.kernels`. From the root it would
also import as a top-level `kernels` package and shadow the installed package of that name that
transformers imports: `python -m pytest` puts the working directory first on sys.path, and pytest
puts this file's folder there to import it. Nothing the tests import lives at the root (they
import the installed minivllm and tests/ helpers), so every root entry is taken off again here,
before any test module imports transformers.
"""

from __future__ import annotations

import os
import sys

_ROOT = os.path.realpath(os.path.dirname(__file__))

sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != _ROOT]
