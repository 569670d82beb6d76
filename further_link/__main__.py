"""``python -m further_link`` is the ``further-link`` command."""

import sys

from further_link.cli import main

sys.exit(main())
