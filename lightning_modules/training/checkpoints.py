"""What a PRD checkpoint holds, and how it comes back: the trainable weights only, the accumulation window and
the skip counters (a mixin of `PRDModule`), and `export_student_weights` (training checkpoint -> student weights).

`state_dict()` holds only what trains (the student's adapters, the new VAE conv_out and the MLPs, a learned
background), never the frozen base or the teachers; `load_state_dict` checks those keys strictly and says in one
line (`CheckpointMismatchError`) when a checkpoint comes from another configuration. A checkpoint written in the
middle of an accumulation window also holds the gradients gathered so far, put back in `on_train_start`.

`mend_loop_state` mends the loop state of the checkpoints Lightning writes after training stopped (see there):
without it a run resumed from such a checkpoint with `max_steps` took batches from the wrong epochs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from renderers.errors import UserError

log = logging.getLogger(__name__)

CHECKPOINT_KEY = "prd"
CHECKPOINT_FORMAT = 1


class CheckpointMismatchError(UserError, ValueError):
    """A checkpoint's trainable weights do not fit this module's configuration (one-line message)."""


class CheckpointFileError(UserError, ValueError):
    """A checkpoint path that is missing, a folder, truncated, corrupt or not a training checkpoint (one line)."""


def _one_line(err: BaseException, limit: int = 200) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_checkpoint(path: str | os.PathLike, option: str = "--ckpt_path") -> dict[str, Any]:
    """The checkpoint at `path`, memory-mapped (cheap also for GB-sized files; `weights_only=True`), or a
    one-line `CheckpointFileError` when it is missing, a folder, truncated, corrupt or not a Lightning
    training checkpoint (no `state_dict`)."""
    file = Path(path).expanduser()
    if file.is_dir():
        raise CheckpointFileError(f"{option} {str(path)!r} is a folder, not a checkpoint file")
    if not file.is_file():
        raise CheckpointFileError(f"{option} {str(path)!r}: no such checkpoint file")
    checkpoint = None
    try:
        checkpoint = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        try:  # files of the legacy (non-zip) format cannot be memory-mapped
            checkpoint = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as err:
            raise CheckpointFileError(
                f"{option} {str(path)!r} is not a readable checkpoint (truncated, corrupt or not a PyTorch "
                f"checkpoint: {_one_line(err)}); resume from another checkpoint or start without --ckpt_path"
            ) from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointFileError(
            f"{option} {str(path)!r} is not a Lightning training checkpoint (no state_dict): resume from a "
            "checkpoint that `prd fit` wrote"
        )
    return checkpoint


# Hyper-parameters of PRDModule a resumed run must share with its checkpoint: they fix which weights train and
# their shapes (base, student, learned background), or the layout of the optimizer / scheduler state. A renderer
# counts by its name and class (its settings are not structural). Every other hyper-parameter is not structural.
STRUCTURAL_HPARAMS = ("base", "student_config", "background", "renderers", "optimizer.class_path", "lr_scheduler.class_path")


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping) and value:
        flat = {}
        for key, item in value.items():
            if not str(key).startswith("_"):
                flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value}


def _structural(key: str) -> bool:
    if key.startswith("renderers."):  # renderers.<name>.class_path (or a renderer given as a plain value)
        parts = key.split(".")
        return len(parts) == 2 or parts[2] == "class_path"
    return any(key == s or key.startswith(s + ".") for s in STRUCTURAL_HPARAMS if s != "renderers")


def _same_value(a: Any, b: Any) -> bool:
    """Equal, also when one side is the command line's text of the other (`--model...student_config.ranks 4`
    reaches a dict-typed argument as the string "4")."""
    if a == b:
        return True
    if isinstance(a, str) != isinstance(b, str):
        import yaml

        text, other = (a, b) if isinstance(a, str) else (b, a)
        try:
            return yaml.safe_load(text) == other
        except yaml.YAMLError:
            return False
    return False


def hparam_differences(stored: Mapping[str, Any], current: Mapping[str, Any]) -> tuple[list[tuple], list[tuple]]:
    """(structural, other) differences between a checkpoint's hyper-parameters and this run's, each a list of
    (dotted key, checkpoint value, this run's value); a key missing on one side has the value None there."""
    a, b = _flatten(dict(stored)), _flatten(dict(current))
    renderers = ({k.split(".")[1] for k in a if k.startswith("renderers.")}, {k.split(".")[1] for k in b if k.startswith("renderers.")})
    structural, other = [], []
    if renderers[0] != renderers[1]:
        structural.append(("renderers", sorted(renderers[0]), sorted(renderers[1])))
    for key in sorted(set(a) | set(b)):
        if _same_value(a.get(key), b.get(key)):
            continue
        if key.startswith("renderers.") and key.split(".")[1] not in renderers[0] & renderers[1]:
            continue  # reported once, as the set of renderers
        (structural if _structural(key) else other).append((key, a.get(key), b.get(key)))
    return structural, other


class TrainableStateMixin:
    """`PRDModule`'s trainable parameters, state dict and checkpoint hooks (uses its `student`, `background`,
    `renderers`, skip counters and accumulation window)."""

    def trainable_named_parameters(self) -> dict[str, nn.Parameter]:
        """Canonical name -> parameter of everything that trains: the student's adapters, conv_out and
        MLPs, and any renderer / background parameters that require gradients. The frozen base and the
        teachers never appear."""
        student = self._require_student()
        named = {f"student.{name}": p for name, p in student.trainable_state_dict().items()}
        seen = {id(p) for p in named.values()}
        for prefix, module in (("background", self.background), ("renderers", self.renderers)):
            if module is None:
                continue
            for name, p in module.named_parameters(prefix=prefix):
                if id(p) not in seen and p.requires_grad:
                    seen.add(id(p))
                    named[name] = p
        return named

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.trainable_named_parameters().values())

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """Only the trainable weights (see `trainable_named_parameters`): what every checkpoint holds."""
        if args:  # the deprecated positional form of nn.Module.state_dict
            raise TypeError("PRDModule.state_dict takes keyword arguments only")
        state = destination if destination is not None else {}
        for name, p in self.trainable_named_parameters().items():
            state[prefix + name] = p if keep_vars else p.detach()
        return state

    def load_state_dict(self, state_dict: Mapping[str, Tensor], strict: bool = True, assign: bool = False):
        """Load trainable weights. Every trainable key must be present with its shape (else a one-line
        error); keys of the frozen base are ignored; other keys are an error when `strict`."""
        own = self.trainable_named_parameters()
        missing = [key for key in own if key not in state_dict]
        frozen = {name for name, _ in self.named_parameters(remove_duplicate=False)} | set(
            super().state_dict(keep_vars=True)
        )
        unexpected = [key for key in state_dict if key not in own and key not in frozen]
        wrong = [
            f"{key} {tuple(state_dict[key].shape)} vs {tuple(p.shape)}"
            for key, p in own.items()
            if key in state_dict and tuple(state_dict[key].shape) != tuple(p.shape)
        ]
        problems = []
        if missing:
            problems.append(f"{len(missing)} trainable weight(s) missing ({', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''})")
        if unexpected and strict:
            problems.append(f"{len(unexpected)} unknown key(s) ({', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''})")
        if wrong:
            problems.append(f"{len(wrong)} wrong shape(s) (checkpoint vs model: {', '.join(wrong[:5])})")
        if problems:
            raise CheckpointMismatchError(
                f"checkpoint does not fit this PRDModule ({self.student.config_summary()}): {'; '.join(problems)}; "
                "resume with the config that wrote it (student_config, renderers, background)"
            )
        with torch.no_grad():
            for key, p in own.items():
                p.copy_(state_dict[key].to(p.dtype))
        return nn.modules.module._IncompatibleKeys([], unexpected)

    def on_train_start(self) -> None:
        if self._pending_grads:
            own = self.trainable_named_parameters()
            for name, grad in self._pending_grads.items():
                own[name].grad = grad.to(own[name].device, own[name].dtype)
        self._pending_grads = None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # state_dict() already holds only the trainable weights; the rest PRD needs to resume exactly:
        state: dict[str, Any] = {
            "format": CHECKPOINT_FORMAT,
            "nonfinite_skips": self.nonfinite_skips,
            "consecutive_skips": self.consecutive_skips,
            "window_batches": self._window_batches,
            "window_nonfinite": list(self._window_nonfinite),
            "student_config": self.student.config.to_dict(),
        }
        if self._window_batches:  # saved mid accumulation window: keep the gradients gathered so far
            state["window_grads"] = {
                name: p.grad.detach().cpu().clone()
                for name, p in self.trainable_named_parameters().items()
                if p.grad is not None
            }
        checkpoint[CHECKPOINT_KEY] = state
        trainer = getattr(self, "_trainer", None)
        if trainer is not None and trainer.state.fn == "fit":
            mend_loop_state(checkpoint, trainer.num_training_batches)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Called by the Trainer before it restores the loops from `checkpoint` (a checkpoint written before
        # on_save_checkpoint mended it; see mend_loop_state).
        mend_loop_state(checkpoint)
        state = checkpoint.get(CHECKPOINT_KEY)
        if state is None:
            log.warning("checkpoint has no %r section (not written by PRDModule?): counters start at 0", CHECKPOINT_KEY)
            return
        self.nonfinite_skips = int(state.get("nonfinite_skips", 0))
        self.consecutive_skips = int(state.get("consecutive_skips", 0))
        self._window_batches = int(state.get("window_batches", 0))
        self._window_nonfinite = list(state.get("window_nonfinite", []))
        self._pending_grads = dict(state.get("window_grads", {})) or None


_COUNTERS = ("ready", "started", "processed", "completed")


def _all_equal(progress: Any) -> bool:
    return isinstance(progress, dict) and None not in {progress.get(k) for k in _COUNTERS} and len({progress[k] for k in _COUNTERS}) == 1


def mend_loop_state(checkpoint: dict[str, Any], batches_per_epoch: float | None = None) -> str | None:
    """Mend, in place, the fit-loop state of a checkpoint written after training stopped; returns what was
    mended ("epoch end" / "mid-epoch") or None.

    Lightning 2.6 closes the running epoch when training stops (its epoch counters say "done") but resets the
    per-epoch batch counter only when the NEXT epoch starts. A checkpoint written then, before the next epoch (the
    `last.ckpt` that `ModelCheckpoint(save_last=True)` writes in `on_train_end` when `max_steps` is not a multiple
    of `every_n_train_steps`, or `trainer.save_checkpoint` after `fit`), is resumed wrongly with `max_steps`
    (iteration-based training, always a restart for Lightning):

    - stopped at an epoch end ("batch N of N done"): the next epoch starts from that counter, ends after one
      batch, and every later batch comes from the wrong epoch (the weights drift from the uninterrupted run);
      the per-epoch counter is set to 0, as Lightning would have at the start of the next epoch;
    - stopped mid-epoch ("batch k of N done" in an epoch marked done): the epoch count is one ahead of the
      uninterrupted run's; the epoch is marked as started and not yet processed, so it resumes as the same
      epoch, at batch k.

    `batches_per_epoch` (the trainer's `num_training_batches`, known when saving) tells the two apart; without it
    (loading a checkpoint written before this fix) only the unambiguous epoch end (`is_last_batch`) is mended.
    Checkpoints written inside an epoch (`on_train_batch_end`, validation, `on_train_epoch_end`) do not match and
    are left alone, as are totals and the data position.
    """
    fit = (checkpoint.get("loops") or {}).get("fit_loop")
    if not isinstance(fit, dict):
        return None
    epochs = fit.get("epoch_progress") or {}
    batches = fit.get("epoch_loop.batch_progress") or {}
    current = batches.get("current")
    if not (_all_equal(epochs.get("current")) and _all_equal(epochs.get("total")) and _all_equal(current)):
        return None  # written inside an epoch: Lightning resumes it right
    done = current["ready"]
    if not done:
        return None
    if batches.get("is_last_batch") or (batches_per_epoch is not None and done >= batches_per_epoch):
        for key in _COUNTERS:
            current[key] = 0
        batches["is_last_batch"] = False
        return "epoch end"
    if batches_per_epoch is None or epochs["current"]["completed"] < 1:
        return None
    for progress in (epochs["current"], epochs["total"]):
        progress["processed"] -= 1
        progress["completed"] -= 1
    checkpoint["epoch"] = epochs["current"]["completed"]
    return "mid-epoch"


def export_student_weights(checkpoint_path: str | os.PathLike, directory: str | os.PathLike) -> Path:
    """Turn a PRD training checkpoint into student weights (`model.safetensors` + `config.json`) without
    building any model: the `student.*` entries of its state dict and the student config it recorded."""
    from safetensors.torch import save_file

    from lightning_modules.student.config import StudentConfig
    from lightning_modules.student.weights import CONFIG_NAME, OWN_FORMAT, SAFETENSORS_NAME

    path = Path(checkpoint_path)
    if not path.is_file():
        raise UserError(f"checkpoint {str(path)!r} does not exist")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    section = checkpoint.get(CHECKPOINT_KEY) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not isinstance(section, dict) or "student_config" not in section:
        raise UserError(f"{path} is not a PRDModule training checkpoint (no state_dict / {CHECKPOINT_KEY!r} section)")
    weights = {k.removeprefix("student."): v.contiguous() for k, v in state.items() if k.startswith("student.")}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(directory / SAFETENSORS_NAME), metadata={"format": OWN_FORMAT})
    StudentConfig.from_dict(section["student_config"], source=str(path)).to_json(directory / CONFIG_NAME)
    return directory
