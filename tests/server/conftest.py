"""Server tests: make ``server`` the repository's package, not this test folder.

``tests/`` is on ``sys.path`` (its conftest's folder), and there ``server`` is this folder
without an ``__init__.py``, i.e. a namespace package that would shadow the real one under
an editable install. The repository root first makes ``import server`` find the package.
"""

from __future__ import annotations

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if sys.path[:1] != [_ROOT]:
    sys.path.insert(0, _ROOT)
if getattr(sys.modules.get("server"), "__file__", "") is None:  # imported as a namespace
    del sys.modules["server"]
