"""An exponential moving average of the trainable weights (``train.ema``): the model that is scored and kept.

The cosine schedule anneals the last steps, but each step still moves the LoRA factors, the SID rows and the item
head's rows by one batch's gradient. An average of the weights over the last few hundred steps is a smoother point
of the same run (Polyak averaging; model selection and the saved model both use it). The average starts at the
initial weights, its effective decay ramps up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates (so the
first steps are not held back by the random start), and it is kept in float32 beside the live weights: one more
copy of the trainable tensors only, never of the frozen backbone.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


class WeightAverage:
    """The moving average of ``named`` (``[(name, parameter)]``) with ``decay`` per optimizer step."""

    def __init__(self, named: list[tuple[str, torch.nn.Parameter]], decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema must be in (0, 1), got {decay}")
        self.named, self.decay = named, float(decay)
        self.shadow = {n: p.detach().float().clone() for n, p in named}
        self.updates = 0

    def rate(self) -> float:
        """The decay the next update uses (ramped up over the first updates)."""
        return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        """Fold the live weights into the average (call after every optimizer step)."""
        d = self.rate()
        self.updates += 1
        for n, p in self.named:
            self.shadow[n].lerp_(p.detach().float(), 1.0 - d)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """Overwrite the live weights with the average."""
        for n, p in self.named:
            p.copy_(self.shadow[n].to(p.dtype))

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The average in place of the live weights inside the block (e.g. to score it); the live ones after."""
        live = {n: p.detach().clone() for n, p in self.named}
        self.copy_to_model()
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.named:
                    p.copy_(live[n])

    def state(self) -> tuple[dict[str, torch.Tensor], int]:
        """The tensors and update count a checkpoint keeps."""
        return dict(self.shadow), self.updates

    def load_state(self, tensors: dict[str, torch.Tensor], updates: int) -> None:
        missing = [n for n, _ in self.named if n not in tensors]
        if missing:
            raise ValueError(f"checkpoint has no weight average for {missing[:3]}")
        for n, _ in self.named:
            self.shadow[n] = tensors[n].float().clone()
        self.updates = int(updates)
