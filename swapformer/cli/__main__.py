"""``python -m swapformer.cli``: the ``swapformer`` command."""

import sys

from swapformer.cli import main

sys.exit(main())
