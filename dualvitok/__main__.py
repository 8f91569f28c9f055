"""``python -m dualvitok``: the same as the ``dualvitok`` command."""

import sys

from .cli import main

sys.exit(main())
