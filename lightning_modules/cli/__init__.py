"""The command line: the `prd` console command and its subcommands. `main.py` dispatches `prd fit | validate |
test | predict` to LightningCLI (YAML configs with `class_path`, see configs/) and the other subcommands to
their modules: `generate.py` (`prd generate`, prompts -> mesh files), `evaluate.py` (`prd eval`, CLIP score of
generated or given meshes) and the CPU demo (`prd demo`, in `lightning_modules.demo`). Nothing below this layer
imports it; it turns every `renderers.errors.UserError` into one line on stderr and exit code 2.
"""

from lightning_modules.cli.main import main
from renderers.errors import UserError

__all__ = ["UserError", "main"]
