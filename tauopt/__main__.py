"""``python -m tauopt`` and the ``tauopt`` console script."""

import sys

from tauopt._cli import main

if __name__ == "__main__":
    sys.exit(main())
