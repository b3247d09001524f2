"""`python -m lightning_modules.demo` = `prd demo` (what `make demo` runs)."""

import gc
import sys

from lightning_modules.demo.cpu_demo import main

code = main()
gc.freeze()  # the exit's full collection of everything torch and Lightning imported took seconds; nothing needs it
sys.exit(code)
