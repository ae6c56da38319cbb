"""``python -m layerwise`` runs the command-line tool."""

import sys

from layerwise.cli import main

sys.exit(main())
