"""The PRD training system. `prd_module.PRDModule` is the LightningModule that trains the student from prompts
only (the loop: denoise, render, score with the teachers, backpropagate); beside it, as its mixins, the
optimizer step with accumulation and non-finite skipping (`optimization.py`), the trainable-only checkpoints
and `export_student_weights` (`checkpoints.py`) and validation (`validation.py`, with `artifacts.py` for the
TensorBoard render grids and meshes). `settings.py` holds its plain settings (cameras, validation, the
student config) and timers, `checkpoint_io.py` the atomic checkpoint writer. Configs name
`lightning_modules.training.prd_module.PRDModule` as the model.
"""
