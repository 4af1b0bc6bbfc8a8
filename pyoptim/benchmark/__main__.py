"""`python -m pyoptim.benchmark`: see pyoptim.benchmark.cli."""

import sys

from pyoptim.benchmark.cli import main

if __name__ == "__main__":
    sys.exit(main())
