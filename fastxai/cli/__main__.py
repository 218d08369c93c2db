"""``python -m fastxai.cli`` (and ``torchrun -m fastxai.cli``): the ``fastxai`` command."""

from fastxai.cli import main

raise SystemExit(main())
