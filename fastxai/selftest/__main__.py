"""``python -m fastxai.selftest``: the device self-test (see :mod:`fastxai.selftest`)."""

from fastxai.selftest import main

raise SystemExit(main())
