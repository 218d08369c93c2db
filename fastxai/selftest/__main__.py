"""``python -m fastxai.selftest [options]``: the same as ``fastxai selftest [options]``."""

import sys

from fastxai.cli import main

raise SystemExit(main(["selftest", *sys.argv[1:]]))
