"""``python -m seqpar``: the command line of :mod:`seqpar.cli`."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
