"""``python -m wsss_fast`` (also what ``torchrun -m wsss_fast`` runs)."""

import sys

from wsss_fast.cli import main

if __name__ == "__main__":
    sys.exit(main())
