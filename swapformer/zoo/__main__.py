"""``python -m swapformer.zoo``: the runner, and the ``_worker`` / ``_calibrate`` processes it starts."""

import sys

from swapformer.zoo.runner import main

sys.exit(main())
