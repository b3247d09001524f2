"""The student generator and its 3D representation. `TriplaneStudent` (`triplane_student.py`) is Stable
Diffusion's UNet and VAE decoder adapted by small adapters (`adapters.py`) to turn noise latents into a
`TriplaneField` (`triplane_field.py`), whose MLPs give SDF, deformation and colour at 3D points through the
`renderers.types.Field` protocol that renderers, teachers and evaluation rely on. `config.py` holds its
hyper-parameters (`StudentConfig`, read from / written to `config.json`), `weights.py` reads and writes its
weights (official `.pth`, own safetensors, hub ids), `sd_configs.py` holds SD 2.1-base's model configs, and
`generation.py` turns prompts into mesh files (`prd generate`'s library). It imports nothing else of
lightning_modules/.

    from lightning_modules.student import TriplaneStudent
"""

from lightning_modules.student.triplane_student import TriplaneStudent

__all__ = ["TriplaneStudent"]
