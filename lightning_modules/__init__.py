"""The TriplaneTurbo student and everything built on it, one subpackage per role, each importing only the
ones below it (`tests/test_layout.py` checks it):

    demo/        the CPU demo of `make demo` (`python -m lightning_modules.demo`) and its tiny models   (top)
    cli/         the `prd` command: LightningCLI entry, `prd generate`, `prd eval`
    training/    the PRD LightningModule, its settings, checkpoints, optimizer step, validation logging
    evaluation/  CLIP score metric, mesh files, the rendering protocol, resumable runs, report
    student/     the student generator and its representation: TriplaneStudent, adapters, the triplane
                 field, weights / config I/O, prompt -> mesh generation                              (bottom)

Below lightning_modules/ come teachers/ (score-distillation teachers, their objectives and schedules), then
datamodules/ (prompts) and renderers/ (cameras, renderers, the shared `Field` protocol and `UserError`).
"""
