"""The losses of DINOv2-style self-supervised training, as sums over samples (the caller divides by a global count).

- DINO (CLS tokens): the cross-entropy between the teacher's assignment of one global crop and the student's
  assignment of every other crop of the same image (dinov2 loss/dino_clstoken_loss.py).
- iBOT (patch tokens): at patches masked in the student's input, the cross-entropy between the teacher's
  assignment of the unmasked patch and the student's; each image's masked patches weigh 1 / (its masked count)
  (dinov2 loss/ibot_patch_loss.py).
- KoLeo (student CLS): -log of each embedding's distance to its nearest neighbour, a spreading regulariser,
  computed in float32 (dinov2 loss/koleo_loss.py).

Teacher targets come from the teacher's logits by centering (softmax((t - centre) / T), the centre an EMA of the
batch mean) or Sinkhorn-Knopp (uniform prototype marginals over the batch). Both need sums over the GLOBAL batch:
the callers pass `reduce_sum` (an all-reduce across ranks; the identity on one process), so this module knows
nothing of torch.distributed and a 1-process and an N-process run compute the same targets.

Why sums: the loss of a global batch is sum(per-sample losses) / (number of samples in the GLOBAL batch), so each
rank's and micro-batch's share adds up to the same objective whatever the split (DESIGN.md, Mixing).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

Reduce = Callable[[torch.Tensor], torch.Tensor]


def identity_reduce(x: torch.Tensor) -> torch.Tensor:
    return x


def cross_entropy(teacher_probs: torch.Tensor, student_logits: torch.Tensor, student_temp: float) -> torch.Tensor:
    """(M,) -sum_k t_k log softmax(s / student_temp)_k, in float32."""
    log_probs = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    return -(teacher_probs.float() * log_probs).sum(dim=-1)


def dino_num_terms(num_global: int, num_local: int) -> int:
    """Student-crop x teacher-crop pairs of an image: each crop against every global crop but itself."""
    terms = num_global * (num_global - 1) + num_global * num_local
    if terms < 1:
        raise ValueError(f"the DINO loss needs two global crops, or one and a local crop; got {num_global} global "
                         f"and {num_local} local")
    return terms


def dino_loss_sum(teacher_probs: torch.Tensor, student_global: torch.Tensor, student_local: torch.Tensor | None,
                  student_temp: float) -> torch.Tensor:
    """Sum over the images and crop pairs of the DINO cross-entropy.

    teacher_probs (G, n, K) for the G global crops; student_global (G, n, K) and student_local (L, n, K) logits.
    Student global crop v is compared with every teacher global crop g != v; local crops with all G.
    """
    total_teacher = teacher_probs.float().sum(dim=0)  # (n, K): the targets of a local crop, summed
    loss = teacher_probs.new_zeros((), dtype=torch.float32)
    for v in range(student_global.shape[0]):
        targets = total_teacher - teacher_probs[v].float()  # every global crop but the student's own view
        loss = loss + cross_entropy(targets, student_global[v], student_temp).sum()
    for v in range(0 if student_local is None else student_local.shape[0]):
        loss = loss + cross_entropy(total_teacher, student_local[v], student_temp).sum()
    return loss


def ibot_patch_weights(masks: torch.Tensor) -> torch.Tensor:
    """(M,) weight of every masked patch (masks (C, P) bool, row-major order): 1 / its crop's masked count."""
    per_crop = masks.sum(dim=1, keepdim=True).clamp(min=1).float()
    return (1.0 / per_crop).expand_as(masks)[masks]


def ibot_loss_sum(teacher_probs: torch.Tensor, student_logits: torch.Tensor, masks: torch.Tensor,
                  student_temp: float) -> torch.Tensor:
    """Sum over crops of the mean iBOT cross-entropy over each crop's masked patches (0 for an unmasked crop).

    teacher_probs and student_logits (M, K) hold the masked patches in `masks.nonzero()` order."""
    if teacher_probs.shape[0] != int(masks.sum()):
        raise ValueError(f"{teacher_probs.shape[0]} patch targets for {int(masks.sum())} masked patches")
    weights = ibot_patch_weights(masks).to(student_logits.device)
    return (cross_entropy(teacher_probs, student_logits, student_temp) * weights).sum()


def koleo_loss_sum(embeddings: torch.Tensor, group_size: int, eps: float = 1e-8) -> torch.Tensor:
    """Sum over samples of -log(distance to the nearest neighbour), neighbours sought within consecutive groups of
    `group_size` rows, in float32 on L2-normalised rows.

    Groups, not the rank's batch: a group is a fixed slice of the global batch (positions k*size .. (k+1)*size),
    so the loss is the same however the global batch is split, as long as every split is a multiple of the size.
    """
    n = embeddings.shape[0]
    if n % group_size:
        raise ValueError(f"KoLeo groups of {group_size} do not tile a batch of {n}")
    if group_size < 2:
        raise ValueError("KoLeo needs groups of at least 2 samples (a nearest neighbour)")
    x = F.normalize(embeddings.float(), p=2, dim=-1, eps=eps).reshape(n // group_size, group_size, -1)
    with torch.no_grad():
        dots = x @ x.transpose(1, 2)
        dots.diagonal(dim1=1, dim2=2).fill_(-2.0)  # never one's own neighbour
        nearest = dots.argmax(dim=2)
    neighbours = torch.gather(x, 1, nearest.unsqueeze(-1).expand_as(x))
    distances = F.pairwise_distance(x.reshape(n, -1), neighbours.reshape(n, -1), p=2, eps=eps)
    return -torch.log(distances + eps).sum()


def centered_softmax(teacher_logits: torch.Tensor, centre: torch.Tensor | None, temp: float) -> torch.Tensor:
    """softmax((t - centre) / temp): centering stops one prototype from dominating, the low temperature sharpens."""
    logits = teacher_logits.float()
    if centre is not None:
        logits = logits - centre
    return F.softmax(logits / temp, dim=-1)


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, temp: float, num_iterations: int = 3,
                   reduce_sum: Reduce = identity_reduce, reduce_max: Reduce = identity_reduce) -> torch.Tensor:
    """Teacher assignments with uniform prototype marginals over the GLOBAL batch (dinov2 sinkhorn_knopp_teacher).

    Q = exp(t / temp) scaled so that every prototype receives 1/K of the mass and every sample 1/B; rows (this
    rank's samples) come back as distributions summing to 1. `reduce_sum`/`reduce_max` combine ranks. The global
    maximum is subtracted first: a global constant cancels in the first normalisation, so only overflow changes.
    """
    logits = teacher_logits.float() / temp
    peak = logits.max() if logits.numel() else logits.new_tensor(float("-inf"))
    peak = reduce_max(peak.clone())
    q = torch.exp(logits - peak).t()  # (K, b)
    num_prototypes = q.shape[0]
    num_samples = reduce_sum(q.new_tensor(float(q.shape[1])))
    q /= reduce_sum(q.sum())
    for _ in range(num_iterations):
        q /= reduce_sum(q.sum(dim=1, keepdim=True))  # each prototype: total mass 1/K ...
        q /= num_prototypes
        q /= q.sum(dim=0, keepdim=True)  # ... each sample: total mass 1/B (a column is one rank's own)
        q /= num_samples
    q *= num_samples
    return q.t()


class TeacherCentre(nn.Module):
    """The EMA of the batch-mean teacher logits (dinov2's DINO and iBOT centres), subtracted before the softmax.

    `update` takes the sum of the batch's logit rows and their count, already summed over ranks, so the centre is
    the same on every rank and on any world size. Its buffer is saved with the teacher.
    """

    def __init__(self, num_prototypes: int, momentum: float = 0.9):
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"centre momentum must be in [0, 1], got {momentum}")
        self.momentum = momentum
        self.register_buffer("centre", torch.zeros(num_prototypes))

    @torch.no_grad()
    def update(self, logit_sum: torch.Tensor, count: torch.Tensor | float) -> None:
        count = torch.as_tensor(count, dtype=torch.float32, device=self.centre.device)
        batch_mean = logit_sum.float().to(self.centre.device) / count.clamp(min=1.0)
        moved = self.centre * self.momentum + batch_mean * (1.0 - self.momentum)
        # Nothing masked anywhere this step: the iBOT centre keeps its value (decided on the device, no sync).
        self.centre.copy_(torch.where(count > 0, moved, self.centre))
