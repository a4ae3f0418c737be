"""``python -m diffad_core.cli``: the ``diffad`` command."""

import sys

from diffad_core.cli import main

sys.exit(main())
