"""``python -m further_link`` is the ``further-link`` command."""

import sys

from .cli import main

sys.exit(main())
