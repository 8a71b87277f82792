"""``python -m swapformer.calibrate`` / ``torchrun --nproc_per_node=N -m swapformer.calibrate``."""

import sys

from swapformer.calibrate.cli import main

if __name__ == "__main__":
    sys.exit(main())
