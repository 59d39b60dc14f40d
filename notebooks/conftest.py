"""Notebooks run by pytest (nbval) write their outputs under a temporary folder, never the project's ``results/``.

``tests/conftest.py`` sets the same when the unit tests are collected too (and checks the project's folders at the
end of the run); this covers ``python -m pytest notebooks/`` alone.
"""

import os
import tempfile

if "retrieval-test-outputs-" not in os.environ.get("RETRIEVAL_OUTPUT_DIR", ""):
    os.environ["RETRIEVAL_OUTPUT_DIR"] = tempfile.mkdtemp(prefix="retrieval-test-outputs-")
