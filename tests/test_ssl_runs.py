"""Stage ssl through `python -m train`: the same losses on 1 and 2 processes, a kill -9 and a resume on another
world size that follows the uninterrupted run, the collapse monitors' negative controls, the teacher's export."""

import json
import sys

import pytest

from sharding.config import CONFIG_ROOT
from train.world import free_port
from train_cases import _env, _events, _kill_after_checkpoint, _run, _steps

SSL_CPU = str(CONFIG_ROOT / "train" / "ssl_cpu.yaml")


def _ssl_overrides(shard_root, **extra) -> list[str]:
    """ssl_cpu.yaml shrunk: 32 px global and 16 px local crops, a 2-layer model, 64 prototypes, batches of 8."""
    base = {"data.loader.shard_root": str(shard_root), "data.global_batch_size": 8, "data.val_max_samples": 16,
            "data.val_batch_size": 16, "data.loader.image_size": 32, "data.mix": "sdss=0.34,decals=0.33,hst=0.33",
            "data.loader.views.global_crops.size": 32, "data.loader.views.local_crops.size": 16,
            "data.loader.views.local_crops.count": 2, "model_overrides": "[backbone.num_hidden_layers=2,"
                                                                         "backbone.drop_path_rate=0.1]",
            "ssl.dino_head.num_prototypes": 64, "ssl.dino_head.hidden_size": 32, "ssl.dino_head.bottleneck_size": 16,
            "ssl.koleo_group_size": 4, "ssl.monitor_every": 1000, "log_every": 1, "checkpoint_every": 3,
            "optim.warmup_steps": 2}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def _command(nproc: int, out_dir, max_steps: int, overrides: list[str], resume: str = "none") -> list[str]:
    args = ["--config", SSL_CPU, "--out-dir", str(out_dir), "--max-steps", str(max_steps), "--resume", resume,
            *overrides]
    if nproc == 1:
        return [sys.executable, "-m", "train", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
            "127.0.0.1", "--master_port", str(free_port()), "-m", "train", *args]


@pytest.mark.slow
def test_ssl_loss_is_the_same_on_any_world_size_and_a_killed_run_resumes_on_another(shard_root, tmp_path):
    """1 process, uninterrupted, is the reference. 2 processes (killed with SIGKILL after the step-3 checkpoint)
    log the same losses for steps 1-3: masks, views, drop path, centre and KoLeo groups do not depend on the
    split. Resumed on 1 process (the universal form of the checkpoint, the teacher and centres from rank 0's file)
    steps 4-6 follow the reference: teacher, heads, centre, schedules and sampler position were all restored."""
    overrides = _ssl_overrides(shard_root, **{"ssl.freeze_last_layer_fraction": 0.5})  # steps 1-3 frozen
    one, two = tmp_path / "one", tmp_path / "two"
    _run(_command(1, one, 6, overrides))
    _kill_after_checkpoint(_command(2, two, 6, overrides), two, "step00000003")
    resumed = _run(_command(1, two, 6, overrides, resume="auto"))
    assert "converted from 2 processes" in resumed.stdout + resumed.stderr
    reference, split = _steps(one), _steps(two)
    assert sorted(reference) == list(range(1, 7)) and set(range(1, 7)) <= set(split)
    for step in range(1, 7):
        a, b = reference[step], split[step]
        assert a["batch_keys_hash"] == b["batch_keys_hash"], step
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), step
        for name in ("dino_loss", "ibot_loss", "koleo_loss", "teacher_entropy", "prototype_entropy", "cls_std"):
            assert b["ssl"][name] == pytest.approx(a["ssl"][name], rel=1e-4, abs=1e-6), (step, name)
    assert reference[3]["ssl"]["ibot_loss"] > 0 and reference[3]["ssl"]["koleo_loss"] != 0
    _check_last_layer_frozen(one / "checkpoints" / "step00000003")
    export = one / "export"
    assert (export / "backbone" / "config.json").is_file() and (export / "ssl_export.json").is_file()
    knn = _events(one, "validation")[-1]["surveys"]
    assert set(knn) == {"sdss", "decals", "hst"} and all(r["probe"] == "knn20" for r in knn.values())
    assert not _events(one, "collapse_warning")


def _check_last_layer_frozen(folder) -> None:
    """At step 3 (the prototype layer frozen so far; step 3 is the first with lr > 0): the student's prototype
    layer is still its initial value, which the teacher (an average of it) equals; the rest of the head moved."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file
    student = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
    teacher = load_file(str(folder / "ssl_teacher.safetensors"))
    for name in ("dino_head.last_layer.weight_v", "dino_head.last_layer.weight_g"):
        assert torch_equal(student[name], teacher[f"network.{name}"]), name
    assert not torch_equal(student["dino_head.mlp.0.weight"], teacher["network.dino_head.mlp.0.weight"])


def torch_equal(a, b) -> bool:
    """Equal up to the EMA's rounding (m * t + (1 - m) * t is t to a few ulps); a training step moves ~1e-4."""
    import torch
    return bool(torch.allclose(a.float(), b.float(), rtol=0, atol=1e-6))


@pytest.mark.slow
@pytest.mark.parametrize("control, kind", [([], None), (["ssl.centering=none"], "dominant"),
                                           (["ssl.teacher_temp=1.0", "ssl.warmup_teacher_temp=1.0"], "uniform")])
def test_negative_controls_trip_the_collapse_monitors_and_the_positive_one_does_not(shard_root, tmp_path, control,
                                                                                     kind):
    """12 steps at a high learning rate, so a collapse shows within the test: without centering the teacher puts
    every image on one or two prototypes; at teacher temperature 1.0 its targets are uniform from the start."""
    overrides = _ssl_overrides(shard_root, checkpoint_every=1000, **{"data.val_max_samples": 8, "optim.lr": 0.02})
    _run(_command(1, tmp_path, 12, [*overrides, *control]))
    warnings = _events(tmp_path, "collapse_warning")
    assert [w["kind"] for w in warnings] == ([kind] if kind else []), warnings
    if kind == "dominant":
        assert "centering is off" in warnings[0]["cause"]
    if kind == "uniform":
        assert "teacher temperature (1.0) is too high" in warnings[0]["cause"]


@pytest.mark.gpu
def test_ssl_on_cuda_in_bf16_follows_the_cpu_run_with_an_fp32_teacher(shard_root, tmp_path):
    """One process on the GPU (NCCL; a bf16 student under DeepSpeed, the teacher fp32 with bf16 autocast) against
    fp32 on the CPU: the same batches, the first loss to bf16 precision, finite losses, an fp32 teacher saved."""
    import numpy as np
    from safetensors.torch import load_file
    overrides = _ssl_overrides(shard_root)
    runs = {"cpu": (tmp_path / "cpu", ["device=cpu"]), "cuda": (tmp_path / "cuda", ["device=cuda", "precision=bf16"])}
    for out, extra in runs.values():
        _run(_command(1, out, 4, [*overrides, *extra]))
    cpu, cuda = _steps(runs["cpu"][0]), _steps(runs["cuda"][0])
    assert [cuda[s]["batch_keys_hash"] for s in cuda] == [cpu[s]["batch_keys_hash"] for s in cpu]
    assert cuda[1]["loss"] == pytest.approx(cpu[1]["loss"], rel=3e-2)
    assert all(np.isfinite(r["loss"]) for r in cuda.values())
    teacher = load_file(str(runs["cuda"][0] / "checkpoints" / "step00000004" / "ssl_teacher.safetensors"))
    assert {str(t.dtype) for t in teacher.values()} == {"torch.float32"}
    assert (runs["cuda"][0] / "export" / "backbone" / "model.safetensors").is_file()
