#!/usr/bin/env python
"""Send a submission to the evaluation server: ``python submit.py SUBMISSION --group NAME [options]``.

A thin entry point over :mod:`helpers.client` (see ``python submit.py --help``). The URL comes from ``--url``, else
the environment variable ``RETRIEVAL_SERVER_URL``, else the course server. Every try is appended to
``submissions/submit_log.jsonl``.
"""

import sys
from pathlib import Path

try:
    from helpers.client import main
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from helpers.client import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
