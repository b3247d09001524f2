"""The CPU demo of `make demo` (`python -m lightning_modules.demo`, `prd demo`): `cpu_demo.py` trains
configs/demo_cpu.yaml on the CPU with the analytic shape teacher, exports each prompt's mesh and measures its
Chamfer distance to the target. `tiny_models.py` builds the tiny Stable Diffusion directories it trains on
(random, or briefly pretrained: `build_demo_base`); the tests build theirs with it too. Nothing in the
production path imports this package.
"""
