"""`python -m tuneforge.cli`: the same command as the `tuneforge` console script."""

import sys

from tuneforge.cli import main

sys.exit(main())
