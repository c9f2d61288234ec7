"""Stage ssl's pieces on tensors: losses against hand-computed cases, Sinkhorn-Knopp, centres, EMA, masks, heads,
schedules, monitors and the kNN probe. Sums over the global batch are checked on a simulated world of two ranks
(threads meeting at a barrier), so the world-size invariance of the targets is tested without processes."""

import math
import threading

import numpy as np
import pytest
import torch

from models.ssl_heads import DINOHead, DINOHeadConfig, WeightNormedLinear
from models.ssl_losses import (TeacherCentre, centered_softmax, cross_entropy, dino_loss_sum, dino_num_terms,
                               ibot_loss_sum, koleo_loss_sum, sinkhorn_knopp)
from models.ssl_masks import MaskConfig, block_mask, draw_masks
from models.sample_noise import sample_seeds
from train import ssl_schedules as schedules
from train.ssl_knn import knn_predict
from train.ssl_monitor import MonitorSums, collapse_kind, likely_cause


class ThreadWorld:
    """`world_size` threads whose reduce_sum / reduce_max meet at a barrier: all-reduce without processes."""

    def __init__(self, world_size: int):
        self.world_size, self.barrier, self.slots = world_size, threading.Barrier(world_size), {}

    def _reduce(self, rank: int, x: torch.Tensor, op) -> torch.Tensor:
        self.slots[rank] = x.clone()
        self.barrier.wait()
        out = op(torch.stack([self.slots[r] for r in range(self.world_size)]))
        self.barrier.wait()  # everyone has read before the next reduction overwrites a slot
        return out

    def run(self, fn, parts):
        results = [None] * self.world_size

        def target(rank):
            total = lambda x: self._reduce(rank, x, lambda s: s.sum(0))  # noqa: E731
            peak = lambda x: self._reduce(rank, x, lambda s: s.max(0).values)  # noqa: E731
            results[rank] = fn(parts[rank], total, peak)
        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.world_size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return results


def test_uniform_teacher_and_student_give_ln_k():
    k, n, num_global, num_local = 37, 5, 2, 3
    teacher = torch.full((num_global, n, k), 1.0 / k)
    student_global, student_local = torch.zeros(num_global, n, k), torch.zeros(num_local, n, k)
    total = dino_loss_sum(teacher, student_global, student_local, student_temp=0.1)
    assert float(total / (dino_num_terms(num_global, num_local) * n)) == pytest.approx(math.log(k), rel=1e-6)
    masks = torch.zeros(4, 9, dtype=torch.bool)
    masks[0, :3], masks[2, 1:8] = True, True
    m = int(masks.sum())
    ibot = ibot_loss_sum(torch.full((m, k), 1.0 / k), torch.zeros(m, k), masks, 0.1)
    assert float(ibot) == pytest.approx(2 * math.log(k), rel=1e-6)  # two masked crops, each ln K on average


def test_dino_loss_is_every_crop_against_every_other_global_crop():
    torch.manual_seed(0)
    num_global, num_local, n, k = 2, 2, 3, 6
    teacher = torch.softmax(torch.randn(num_global, n, k), dim=-1)
    student_global, student_local = torch.randn(num_global, n, k), torch.randn(num_local, n, k)
    expected = 0.0
    for v, student in enumerate([*student_global, *student_local]):
        for g in range(num_global):
            if v != g:
                log_p = torch.log_softmax(student / 0.1, dim=-1)
                expected += float(-(teacher[g] * log_p).sum())
    assert float(dino_loss_sum(teacher, student_global, student_local, 0.1)) == pytest.approx(expected, rel=1e-5)
    assert dino_num_terms(2, 8) == 2 + 16
    with pytest.raises(ValueError, match="two global crops"):
        dino_num_terms(1, 0)


def test_ibot_weights_each_crop_by_its_masked_count():
    k = 4
    masks = torch.tensor([[True, True, False], [False, False, False], [True, False, False]])
    teacher = torch.softmax(torch.randn(3, k), dim=-1)
    student = torch.randn(3, k)
    ce = cross_entropy(teacher, student, 0.1)
    assert float(ibot_loss_sum(teacher, student, masks, 0.1)) == pytest.approx(float((ce[0] + ce[1]) / 2 + ce[2]))
    with pytest.raises(ValueError, match="masked patches"):
        ibot_loss_sum(teacher[:2], student[:2], masks, 0.1)


def test_koleo_by_hand_and_by_fixed_groups():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.6, 0.8]])
    # Nearest neighbours of the unit vectors: 0 <-> 3 (distance sqrt(0.8)), 1 -> 3 (sqrt(0.4)), 2 -> 1 (sqrt(2)).
    expected = -(math.log(math.sqrt(0.8)) + math.log(math.sqrt(0.4)) + math.log(math.sqrt(2)) +
                 math.log(math.sqrt(0.4)))
    assert float(koleo_loss_sum(x * 3.0, group_size=4)) == pytest.approx(expected, rel=1e-5)  # scale-free
    y = torch.randn(12, 5, dtype=torch.float64)
    whole = koleo_loss_sum(y, group_size=4)
    assert whole.dtype == torch.float32
    assert float(whole) == pytest.approx(float(sum(koleo_loss_sum(y[i:i + 4], 4) for i in (0, 4, 8))), rel=1e-6)
    with pytest.raises(ValueError, match="do not tile"):
        koleo_loss_sum(y, group_size=5)


def test_sinkhorn_knopp_marginals_are_uniform_and_the_same_on_two_ranks():
    torch.manual_seed(1)
    b, k = 24, 8
    logits = torch.randn(b, k) * 3
    q = sinkhorn_knopp(logits, temp=0.5, num_iterations=3)
    assert torch.allclose(q.sum(dim=1), torch.ones(b), atol=1e-5)  # each sample a distribution
    softmax_use = torch.softmax(logits / 0.5, dim=1).sum(dim=0)
    assert q.sum(dim=0).std() < 0.5 * softmax_use.std()  # three iterations (DINOv2's) move towards uniform use
    converged = sinkhorn_knopp(logits, temp=0.5, num_iterations=300)
    assert torch.allclose(converged.sum(dim=0), torch.full((k,), b / k), rtol=1e-4)  # prototypes used equally
    assert torch.allclose(converged.sum(dim=1), torch.ones(b), atol=1e-5)
    halves = ThreadWorld(2).run(lambda part, total, peak: sinkhorn_knopp(part, 0.5, 3, total, peak),
                                [logits[:10], logits[10:]])
    assert torch.allclose(torch.cat(halves), q, atol=1e-6)
    assert torch.allclose(sinkhorn_knopp(logits + 40.0, 0.5), q, atol=1e-6)  # a constant shift changes nothing


def test_centre_is_an_ema_of_the_global_batch_mean_and_centering_sharpens_nothing_away():
    centre = TeacherCentre(3, momentum=0.9)
    rows = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    centre.update(rows.sum(0), 2)
    assert torch.allclose(centre.centre, torch.tensor([0.2, 0.2, 0.2]))
    centre.update(torch.zeros(3), 0)  # nothing masked anywhere: unchanged
    assert torch.allclose(centre.centre, torch.tensor([0.2, 0.2, 0.2]))
    one = TeacherCentre(3)
    two = [TeacherCentre(3), TeacherCentre(3)]
    one.update(rows.sum(0), 2)
    ThreadWorld(2).run(lambda r, total, _: two[r].update(total(rows[r]), total(torch.tensor(1.0))), [0, 1])
    assert torch.equal(two[0].centre, one.centre) and torch.equal(two[1].centre, one.centre)
    p = centered_softmax(torch.tensor([[2.0, 0.0]]), torch.tensor([2.0, 0.0]), temp=0.5)
    assert torch.allclose(p, torch.tensor([[0.5, 0.5]]))


def _student(**overrides):
    from models.config import load_model_config
    from models.ssl_continued import build_student
    config = load_model_config("cpu", [f"backbone.{k}={v}" for k, v in overrides.items()])
    return build_student(config, DINOHeadConfig(num_prototypes=16, hidden_size=32, bottleneck_size=8), None)


def test_teacher_ema_with_m_1_is_a_no_op_and_with_m_0_copies_the_student():
    from models.ssl_arch import SSLTeacher
    torch.manual_seed(0)
    student = _student(num_hidden_layers=1)
    teacher = SSLTeacher(student, 0.9)
    before = {k: v.clone() for k, v in teacher.network.state_dict().items()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    teacher.update(student, momentum=1.0)
    assert all(torch.equal(before[k], v) for k, v in teacher.network.state_dict().items())
    teacher.update(student, momentum=0.0)
    assert all(torch.equal(student.state_dict()[k], v) for k, v in teacher.network.state_dict().items())
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.train().network.training
    state = teacher.saved_state()
    assert "dino_centre.centre" in state and all(not v.requires_grad for v in state.values())
    with pytest.raises(ValueError, match="does not match"):
        teacher.load_saved_state({k: v for k, v in state.items() if k != "dino_centre.centre"})


def test_mask_ratios_stay_within_bounds_and_masks_are_per_sample():
    cfg = MaskConfig()
    grid = (16, 16)
    seeds = sample_seeds(3, 7, torch.arange(200))
    masks = draw_masks(seeds, 2, grid, cfg)
    assert masks.shape == (400, 256) and masks.dtype == torch.bool
    counts = masks.sum(dim=1)
    masked = counts[counts > 0]
    low, high = int(256 * cfg.ratio_min_max[0]), int(256 * cfg.ratio_min_max[1])
    assert ((masked >= low) & (masked <= high)).all()
    assert 0.4 < len(masked) / len(counts) < 0.6  # sample_probability 0.5
    # A sample's masks depend on its seed only: the same rows when drawn within any part of the batch.
    part = draw_masks(seeds[50:60], 2, grid, cfg).reshape(2, 10, 256)
    assert torch.equal(part, masks.reshape(2, 200, 256)[:, 50:60])
    # Blocks: a masked crop's patches mostly have a masked 4-neighbour.
    image = block_mask(np.random.default_rng(0), 16, 16, 100, cfg)
    padded = np.pad(image, 1)
    neighbours = padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
    assert image.sum() == 100 and (neighbours[image]).mean() > 0.9
    assert block_mask(np.random.default_rng(0), 2, 2, 3, cfg).sum() == 3  # no block fits: single patches
    with pytest.raises(ValueError, match="ratio_min_max"):
        MaskConfig(ratio_min_max=(0.5, 0.1))


def test_dino_head_prototypes_have_length_g_and_logits_are_bounded():
    torch.manual_seed(0)
    layer = WeightNormedLinear(8, 5)
    weight = layer.weight_g * layer.weight_v / layer.weight_v.norm(dim=1, keepdim=True)
    assert torch.allclose(weight.norm(dim=1), torch.ones(5))
    head = DINOHead(12, DINOHeadConfig(num_prototypes=7, hidden_size=16, bottleneck_size=4, num_layers=3))
    out = head(torch.randn(10, 12) * 100)
    assert out.shape == (10, 7) and out.abs().max() <= 1.0 + 1e-5
    assert {n for n, _ in head.named_parameters()} >= {"last_layer.weight_g", "last_layer.weight_v"}


def test_schedules_are_dinov2s():
    assert schedules.teacher_momentum(0, 100) == pytest.approx(0.992)
    assert schedules.teacher_momentum(100, 100) == pytest.approx(1.0)
    assert schedules.teacher_momentum(50, 100) == pytest.approx(0.996)
    assert schedules.weight_decay(0, 10) == pytest.approx(0.04) and schedules.weight_decay(10, 10) == pytest.approx(0.4)
    assert [schedules.teacher_temperature(i, 4) for i in range(6)] == pytest.approx([0.04, 0.05, 0.06, 0.07, 0.07,
                                                                                      0.07])
    assert [schedules.last_layer_frozen(i, 2) for i in range(3)] == [True, True, False]
    assert schedules.fraction_to_iterations(0.3, 600) == 180


def test_monitors_read_uniform_and_dominant_collapse():
    k, rows, d = 64, 32, 16
    torch.manual_seed(0)
    spread = torch.randn(rows, d)
    healthy = MonitorSums()
    healthy.add_teacher(torch.eye(k)[torch.randperm(k)[:rows]] * 0.9 + 0.1 / k, spread)
    values = healthy.reduce(lambda x: x)
    assert values["cls_std"] == pytest.approx(1.0, abs=0.25) and values["rankme"] > 0.6 * d
    assert collapse_kind(values) is None
    uniform = MonitorSums()
    uniform.add_teacher(torch.full((rows, k), 1.0 / k), spread)
    values = uniform.reduce(lambda x: x)
    assert values["teacher_entropy"] == pytest.approx(math.log(k)) and collapse_kind(values) == "uniform"
    settings = {"centering": "centering", "teacher_temp": 1.0, "student_temp": 0.1, "global_batch_size": 16,
                "num_global_crops": 2}
    assert "teacher temperature (1.0) is too high" in likely_cause("uniform", values, settings)
    # At DINOv2's own temperatures the advice is not to lower what is already low.
    assert "if the kNN probe still rises" in likely_cause("uniform", values, {**settings, "teacher_temp": 0.05})
    dominant = MonitorSums()
    dominant.add_teacher(torch.eye(k)[torch.zeros(rows, dtype=torch.long)], spread)
    values = dominant.reduce(lambda x: x)
    assert values["prototype_entropy"] == pytest.approx(0.0, abs=1e-6) and collapse_kind(values) == "dominant"
    assert "centering is off" in likely_cause("dominant", values, {**settings, "centering": "none"})
    point = MonitorSums()
    point.add_teacher(torch.eye(k)[torch.randperm(k)[:rows]], torch.ones(rows, d) + 1e-4 * spread)
    values = point.reduce(lambda x: x)
    assert values["cls_std"] < 0.01 and values["rankme"] < 1.5 and collapse_kind(values) == "representation"


def test_knn_predicts_from_the_nearest_labelled_bank_rows():
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    targets = torch.tensor([[1.0, 0.0], [1.0, 5.0], [0.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True], [True, False], [True, True], [True, True]])
    pred = knn_predict(bank, targets, mask, torch.tensor([[1.0, 0.05], [0.05, 1.0]]), k=2)
    assert pred[0, 0] == pytest.approx(1.0) and pred[0, 1] == pytest.approx(0.0)  # row 1 has no feature 1
    assert pred[1, 0] == pytest.approx(0.0) and pred[1, 1] == pytest.approx(1.0)
