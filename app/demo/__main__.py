"""`python -m app.demo`, as `make demo` runs it."""

import sys

from app.demo.job import main

sys.exit(main())
