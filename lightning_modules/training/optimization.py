"""The optimizer side of `PRDModule` (a mixin): the optimizer, the hand-rolled gradient accumulation (Lightning's
does not fit manual optimisation), DDP's `no_sync` for every backward but the window's last, optional clipping,
and the skipping of non-finite steps.

A NaN / inf loss term, latent or gradient marks the accumulation window: at its end the optimizer step is
skipped, the gradients of the WHOLE window are dropped, `nonfinite_skips` is incremented and a warning logged;
after `max_consecutive_skips` skipped windows in a row training stops with an error. Under DDP the decision is
shared by all ranks, so they stay in step.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import Tensor

log = logging.getLogger(__name__)

# The reference optimizer: Adan, lr 2e-4, betas (0.98, 0.92, 0.99), eps 1e-15, no weight decay.
REFERENCE_ADAN = dict(lr=2e-4, betas=(0.98, 0.92, 0.99), eps=1e-15, weight_decay=0.0)


class OptimizerStepMixin:
    """`PRDModule`'s optimizer, accumulation window and non-finite step skipping (uses its `optimizer_factory`,
    `lr_scheduler_factory`, `gradient_clip_val`, `max_consecutive_skips` and the window / skip counters)."""

    def configure_optimizers(self):
        params = self.trainable_parameters()
        if self.optimizer_factory is None:
            from pytorch_optimizer import Adan

            optimizer = Adan(params, **REFERENCE_ADAN)
        else:
            optimizer = self.optimizer_factory(params)
        if self.lr_scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.lr_scheduler_factory(optimizer), "interval": "step"}}

    def _no_sync(self, sync: bool):
        """DDP: skip the gradient all-reduce for every backward but the window's last one."""
        model = getattr(self.trainer.strategy, "model", None)
        if not sync and isinstance(model, torch.nn.parallel.DistributedDataParallel):
            return model.no_sync()
        return contextlib.nullcontext()

    def _backward(self, loss: Tensor, sync: bool) -> None:
        with self._no_sync(sync):
            self.manual_backward(loss)

    def _optimizer_step(self, optimizer, step: int) -> dict[str, float]:
        params = [p for p in self.trainable_parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params]) if params else torch.zeros(())
        bad = bool(self._window_nonfinite) or not bool(torch.isfinite(grad_norm))
        bad = bool(self.trainer.strategy.reduce_boolean_decision(bad, all=False))  # any rank
        batches, reasons = self._window_batches, self._window_nonfinite or ["gradient"]
        self._window_batches, self._window_nonfinite = 0, []
        if bad:
            optimizer.zero_grad(set_to_none=True)
            self.nonfinite_skips += 1
            self.consecutive_skips += 1
            log.warning(
                "non-finite %s at global step %d: optimizer step skipped, gradients of the last %d batch(es) dropped "
                "(%d skipped step(s) so far)", ", ".join(reasons), step, batches, self.nonfinite_skips,
            )  # fmt: skip
            if self.consecutive_skips >= self.max_consecutive_skips:
                raise RuntimeError(
                    f"{self.consecutive_skips} optimizer steps in a row had non-finite losses or gradients "
                    f"(last: {', '.join(reasons)}); training diverged: lower the learning rate or check the teachers"
                )
            return {"grad_norm": float("nan")}
        if self.gradient_clip_val is not None and params:
            torch.nn.utils.clip_grads_with_norm_(params, self.gradient_clip_val, grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        self.consecutive_skips = 0
        return {"grad_norm": float(grad_norm)}
