"""`python -m app.cli`: the same command as the `tuneforge` console script."""

import sys

from app.cli import main

sys.exit(main())
