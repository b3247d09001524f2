"""`python -m lightning_modules.cli ...` = `prd ...` (e.g. under torchrun)."""

import sys

from lightning_modules.cli.main import main

sys.exit(main())
