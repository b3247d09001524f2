"""`python -m lightning_modules.demo` = `prd demo` (what `make demo` runs)."""

import sys

from lightning_modules.demo.cpu_demo import main

sys.exit(main())
