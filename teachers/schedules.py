"""Step-dependent values (CFG scale, teacher timestep range, loss weights, gradient shrink, ...).

A value is given in configs either as a constant or as a threestudio-style linear ramp over
training steps:

    cfg_scale: 7.5                    # constant
    cfg_scale: [0, 20.0, 10.0, 20000] # [start_step, start_value, end_value, end_step]
    t_min: [0.5, 0.02, 20000]         # 3 values: start_step = 0

Before `start_step` the value is `start_value`, after `end_step` it is `end_value`, linear in
between. Ramps are always over optimizer steps (the `global_step`), never epochs.

Use `ScheduleLike` as the type hint of a constructor argument (jsonargparse / LightningCLI then
accepts both YAML forms) and turn it into a callable with `Schedule.parse`:

    self.cfg_scale = Schedule.parse(cfg_scale)
    scale = self.cfg_scale(global_step)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

# The YAML-facing type: a number, or a list of 3 or 4 numbers. (A `Schedule` instance is also
# accepted at runtime by `Schedule.parse`.)
ScheduleLike = Union[float, Sequence[float]]


@dataclass(frozen=True)
class Schedule:
    """A value that ramps linearly from `start_value` at `start_step` to `end_value` at `end_step`."""

    start_step: int
    start_value: float
    end_value: float
    end_step: int

    def __post_init__(self) -> None:
        if self.end_step < self.start_step:
            raise ValueError(
                f"schedule [{self.start_step}, {self.start_value}, {self.end_value}, {self.end_step}]: "
                "end_step must not be smaller than start_step"
            )

    @classmethod
    def constant(cls, value: float) -> Schedule:
        value = float(value)
        return cls(0, value, value, 0)

    @classmethod
    def parse(cls, value: ScheduleLike | Schedule) -> Schedule:
        """Build a schedule from a number, `[start_value, end_value, end_step]` or
        `[start_step, start_value, end_value, end_step]`."""
        if isinstance(value, Schedule):
            return value
        if isinstance(value, bool):
            raise ValueError(f"schedule: expected a number or a list of 3 or 4 numbers, got {value!r}")
        if isinstance(value, (int, float)):
            return cls.constant(value)
        if isinstance(value, (list, tuple)):
            numbers = list(value)
            if len(numbers) == 3:
                numbers = [0, *numbers]
            if len(numbers) == 4 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers
            ):
                start_step, start_value, end_value, end_step = numbers
                for name, step in (("start_step", start_step), ("end_step", end_step)):
                    if float(step) != int(step):
                        raise ValueError(f"schedule {list(value)}: {name} must be a whole number of steps")
                return cls(int(start_step), float(start_value), float(end_value), int(end_step))
        raise ValueError(
            f"schedule: expected a number or a list [start_step, start_value, end_value, end_step] "
            f"(or [start_value, end_value, end_step]), got {value!r}"
        )

    @property
    def is_constant(self) -> bool:
        return self.start_value == self.end_value

    def __call__(self, step: int) -> float:
        if step >= self.end_step:
            return self.end_value
        if step <= self.start_step:
            return self.start_value
        fraction = (step - self.start_step) / (self.end_step - self.start_step)
        return self.start_value + (self.end_value - self.start_value) * fraction

    def __repr__(self) -> str:
        if self.is_constant:
            return f"Schedule({self.start_value})"
        return f"Schedule([{self.start_step}, {self.start_value}, {self.end_value}, {self.end_step}])"


def schedule_value(value: ScheduleLike | Schedule, step: int) -> float:
    """The value of a schedule (or of a plain number) at `step`."""
    return Schedule.parse(value)(step)
