"""``python -m lrqgraph``: the command line, as the ``lrqgraph`` script runs it."""
import sys

from lrqgraph.cli import main

sys.exit(main())
