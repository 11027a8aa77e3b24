"""Knowledge distillation in the trainer: the student also matches a frozen teacher's softened logits.

loss = (1 - alpha) * task + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))

(Hinton, Vinyals and Dean 2015, "Distilling the Knowledge in a Neural Network": the T^2 factor
keeps the soft term's gradients on the scale of the hard one as T changes.) The KL is averaged
over samples for classification and over scored tokens for language modelling.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from kiln.errors import KilnError, first_line
from kiln.runs.artifact import load_source
from kiln.train import tasks

Loss = Callable[[nn.Module, object, torch.Tensor], torch.Tensor]


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
            mask: torch.Tensor | None = None) -> torch.Tensor:
    """T^2 * KL(p_teacher || p_student) at temperature T, the mean over rows (positions where `mask`)."""
    s = student.float().reshape(-1, student.shape[-1])
    t = teacher.float().reshape(-1, teacher.shape[-1])
    if mask is not None:
        keep = mask.reshape(-1)
        s, t = s[keep], t[keep]
    if s.shape[0] == 0:
        return student.sum() * 0.0
    log_p_s = F.log_softmax(s / temperature, dim=-1)
    log_p_t = F.log_softmax(t / temperature, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean()
    return temperature ** 2 * kl


def load_teacher(src: str) -> nn.Module:
    """The teacher from a spec or a run directory, frozen and in eval mode."""
    model = load_source(src).model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def loss_fn(cfg, task: str, model: nn.Module, teacher: nn.Module | None = None) -> Loss:
    """What one training step minimises: the task loss, blended with the teacher's when there is one."""
    if teacher is None:
        return lambda m, x, y: tasks.batch_loss(m, task, x, y, cfg.label_smoothing)[0]
    if hasattr(model, "loss"):
        raise KilnError(f"teacher {cfg.teacher}: distillation needs logits, but model {cfg.model} trains on its own loss(x, y)")
    if task not in ("classification", "language-modeling", "node-classification"):
        raise KilnError(f"teacher {cfg.teacher}: distillation does not apply to a {task} task")
    alpha, temperature = cfg.distill_alpha, cfg.distill_temperature

    def blended(m: nn.Module, x, y) -> torch.Tensor:
        logits = tasks.forward(m, x)
        task_loss, _ = tasks.logits_loss(logits, task, y, cfg.label_smoothing)
        try:
            with torch.no_grad():
                t = tasks.forward(teacher, x)
        except Exception as exc:   # a teacher of another task or input: one line, not a traceback
            raise KilnError(f"teacher {cfg.teacher} does not fit the data: {type(exc).__name__}: {first_line(exc)}") from None
        if t.shape != logits.shape:
            raise KilnError(f"teacher {cfg.teacher} gives logits {tuple(t.shape)} but the student {tuple(logits.shape)}")
        return (1 - alpha) * task_loss + alpha * kd_loss(logits, t, temperature, y != tasks.IGNORE)

    return blended


def dry_run(step_loss: Loss, model: nn.Module, splits) -> None:
    """One step's loss on two training samples, in eval mode and without gradients or random
    draws, so a loss that cannot work (a teacher of another task) fails before anything is written."""
    from torch.utils.data import DataLoader

    x, y = splits.train[0] if splits.task == "node-classification" else next(iter(DataLoader(splits.train, batch_size=2)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            step_loss(model, x, y)
    finally:
        model.train(was_training)
