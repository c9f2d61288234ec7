"""Student, teacher and heads of DINOv2-style training, and the losses as a dict (dinov2 train/ssl_meta_arch.py).

`SSLNetwork` is one network: transformers' Dinov2Model + a DINO head (+ an iBOT head when separate). The student
is one, trained by the DeepSpeed engine; the teacher is another, an fp32 exponential moving average of the student
kept outside the engine (a bf16 teacher would round its EMA steps of (1 - m) ~ 1e-3 relative away).
`SSLMetaArch` holds the teacher and its centres and turns outputs into losses; the student's forward passes are the
caller's (they go through the engine), so this module needs no DeepSpeed and no process group: every sum over the
global batch goes through the `reduce_sum` / `reduce_max` the caller passes.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import nn

from models.backbone import build_backbone
from models.config import ModelConfig
from models.ssl_heads import DINOHead, DINOHeadConfig
from models.ssl_losses import (Reduce, TeacherCentre, centered_softmax, dino_loss_sum, dino_num_terms,
                               ibot_loss_sum, identity_reduce, koleo_loss_sum, sinkhorn_knopp)

Centering = Literal["centering", "sinkhorn_knopp", "none"]


class SSLOutput(NamedTuple):
    cls: torch.Tensor  # (C, D) final-layer CLS tokens (after the backbone's LayerNorm)
    dino: torch.Tensor  # (C, K) DINO head logits of the CLS tokens
    ibot: torch.Tensor | None  # (M, K') iBOT head logits of the selected patch tokens, row-major over (C, P)


class SSLNetwork(nn.Module):
    """Dinov2Model + DINO head (+ separate iBOT head); `config` is the backbone's ModelConfig (for the resume
    identity and the export)."""

    def __init__(self, config: ModelConfig, dino_head: DINOHeadConfig, ibot_head: DINOHeadConfig | None = None):
        super().__init__()
        self.config = config
        self.backbone = build_backbone(config)
        width = config.backbone.hidden_size
        self.dino_head = DINOHead(width, dino_head)
        self.ibot_head = DINOHead(width, ibot_head) if ibot_head is not None else None

    def forward(self, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor | None = None,
                patch_select: torch.Tensor | None = None) -> SSLOutput:
        """`bool_masked_pos` (C, P): patches replaced by the mask token in the input (the student's global crops);
        `patch_select` (C, P): patches whose output tokens go through the iBOT head (default: the masked ones)."""
        hidden = self.backbone(pixel_values=pixel_values, bool_masked_pos=bool_masked_pos).last_hidden_state
        cls = hidden[:, 0]
        select = bool_masked_pos if patch_select is None else patch_select
        if select is None:
            return SSLOutput(cls, self.dino_head(cls), None)
        patches = hidden[:, 1:][select.to(hidden.device)]
        if self.ibot_head is not None:
            return SSLOutput(cls, self.dino_head(cls), self.ibot_head(patches))
        both = self.dino_head(torch.cat([cls, patches]))  # one head pass for CLS and patches, as dinov2
        return SSLOutput(cls, both[:len(cls)], both[len(cls):])


class SSLTeacher(nn.Module):
    """The teacher network and the centres of its DINO and iBOT outputs: everything a resume must restore besides
    the engine's state. `ema_names`: the student parameters it averages (the trainable ones)."""

    def __init__(self, student: SSLNetwork, centre_momentum: float):
        super().__init__()
        self.network = copy.deepcopy(student).float().requires_grad_(False).eval()
        self.ema_names = [name for name, p in student.named_parameters() if p.requires_grad]
        ibot = student.ibot_head or student.dino_head
        self.dino_centre = TeacherCentre(student.dino_head.config.num_prototypes, centre_momentum)
        self.ibot_centre = TeacherCentre(ibot.config.num_prototypes, centre_momentum)

    def train(self, mode: bool = True) -> "SSLTeacher":
        return super().train(False)  # no drop path or dropout in the teacher, ever

    @torch.no_grad()
    def update(self, student: nn.Module, momentum: float) -> None:
        """teacher = m * teacher + (1 - m) * student over the trainable parameters (the frozen ones are equal).

        m = 1 leaves the teacher bit for bit; m = 0 copies the student (t * 0 + s * 1 is exact)."""
        params = dict(student.named_parameters())
        mine = dict(self.network.named_parameters())
        teacher = [mine[name] for name in self.ema_names]
        source = [params[name].detach().to(mine[name].device, torch.float32) for name in self.ema_names]
        torch._foreach_mul_(teacher, momentum)
        torch._foreach_add_(teacher, source, alpha=1.0 - momentum)

    def saved_state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint holds: the averaged parameters and the centres (frozen weights are the student's)."""
        mine = dict(self.network.named_parameters())
        state = {f"network.{name}": mine[name] for name in self.ema_names}
        state["dino_centre.centre"] = self.dino_centre.centre
        state["ibot_centre.centre"] = self.ibot_centre.centre
        return {k: v.detach().contiguous().cpu() for k, v in state.items()}

    def load_saved_state(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.saved_state())
        if set(state) != expected:
            raise ValueError(f"teacher state does not match this run: missing {sorted(expected - set(state))[:5]}, "
                             f"unexpected {sorted(set(state) - expected)[:5]}")
        missing, unexpected = self.load_state_dict(state, strict=False)
        assert not unexpected, unexpected


@dataclass(frozen=True)
class LossSettings:
    student_temp: float = 0.1
    centering: Centering = "centering"
    sinkhorn_iterations: int = 3
    dino_weight: float = 1.0
    ibot_weight: float = 1.0
    koleo_weight: float = 0.1
    koleo_group_size: int = 64


class Targets(NamedTuple):
    dino: torch.Tensor  # (C, K) teacher distributions of the global crops' CLS
    ibot: torch.Tensor | None  # (M, K') teacher distributions of the masked patches


class SSLMetaArch:
    """The teacher, its targets and the student's losses; `reduce_sum`/`reduce_max` sum over ranks."""

    def __init__(self, student: SSLNetwork, settings: LossSettings, centre_momentum: float = 0.9,
                 reduce_sum: Reduce = identity_reduce, reduce_max: Reduce = identity_reduce):
        self.settings = settings
        self.teacher = SSLTeacher(student, centre_momentum)
        self.reduce_sum, self.reduce_max = reduce_sum, reduce_max

    @torch.no_grad()
    def teacher_output(self, global_crops: torch.Tensor, masks: torch.Tensor | None,
                       autocast_dtype: torch.dtype | None = None) -> SSLOutput:
        """The teacher on unmasked global crops; iBOT logits at the patches the student will see masked."""
        autocast = (torch.autocast(global_crops.device.type, dtype=autocast_dtype) if autocast_dtype is not None
                    else contextlib.nullcontext())
        with autocast:  # fp32 weights, bf16 arithmetic on a GPU (as dinov2's FSDP mixed precision)
            out = self.teacher.network(global_crops.float(), patch_select=masks)
        return SSLOutput(out.cls.float(), out.dino.float(), None if out.ibot is None else out.ibot.float())

    def _assign(self, logits: torch.Tensor, centre: TeacherCentre, temp: float) -> torch.Tensor:
        how = self.settings.centering
        if how == "sinkhorn_knopp":
            return sinkhorn_knopp(logits, temp, self.settings.sinkhorn_iterations, self.reduce_sum, self.reduce_max)
        return centered_softmax(logits, centre.centre if how == "centering" else None, temp)

    @torch.no_grad()
    def targets(self, dino_logits: torch.Tensor, ibot_logits: torch.Tensor | None, temp: float) -> Targets:
        """Teacher distributions of ALL of this rank's rows (Sinkhorn-Knopp couples the global batch), then the
        centres move to this step's global means (after use: they centre the next step, as in dinov2)."""
        dino = self._assign(dino_logits, self.teacher.dino_centre, temp)
        ibot = None if ibot_logits is None else self._assign(ibot_logits, self.teacher.ibot_centre, temp)
        if self.settings.centering == "centering":
            count = self.reduce_sum(dino_logits.new_tensor(float(dino_logits.shape[0])))
            self.teacher.dino_centre.update(self.reduce_sum(dino_logits.sum(dim=0)), count)
            if ibot_logits is not None:
                count = self.reduce_sum(ibot_logits.new_tensor(float(ibot_logits.shape[0])))
                self.teacher.ibot_centre.update(self.reduce_sum(ibot_logits.sum(dim=0)), count)
        return Targets(dino, ibot)

    def losses(self, student_global: SSLOutput, student_local: SSLOutput | None, masks: torch.Tensor | None,
               targets: Targets, num_global: int, global_batch_size: int) -> dict[str, torch.Tensor]:
        """This micro-batch's shares of the global batch's losses: sums over its images divided by the number of
        images in the GLOBAL batch (and the pairs per image), so the shares of any split add up to the same loss.

        student_global holds the G global crops crop-major (C = G * n rows); student_local the L local crops."""
        s = self.settings
        n = student_global.cls.shape[0] // num_global
        num_local = 0 if student_local is None else student_local.cls.shape[0] // n
        terms = dino_num_terms(num_global, num_local)
        local = None if student_local is None else student_local.dino.reshape(num_local, n, -1)
        dino = dino_loss_sum(targets.dino.reshape(num_global, n, -1), student_global.dino.reshape(num_global, n, -1),
                             local, s.student_temp) / (terms * global_batch_size)
        zero = dino.new_zeros(())
        ibot = zero
        if targets.ibot is not None and masks is not None and student_global.ibot is not None:
            ibot = ibot_loss_sum(targets.ibot, student_global.ibot, masks, s.student_temp) / (
                num_global * global_batch_size)
        koleo = zero
        if s.koleo_weight > 0:
            crops = student_global.cls.reshape(num_global, n, -1)
            koleo = sum(koleo_loss_sum(crops[g], s.koleo_group_size) for g in range(num_global)) / global_batch_size
        total = s.dino_weight * dino + s.ibot_weight * ibot + s.koleo_weight * koleo
        return {"loss": total, "dino": dino, "ibot": ibot, "koleo": koleo}
