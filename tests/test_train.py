"""Training under DeepSpeed on CPU: configs, one process, 2-process torchrun ZeRO-2/3, kill + resume, pre-emption."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from sharding.config import CONFIG_ROOT
from train.config import load_train_config
from train_cases import (REPO, TINY, _command, _env, _events, _kill_after_checkpoint, _overrides, _run, _steps,
                         free_port)


def test_every_train_config_loads_and_unknown_keys_fail():
    for path in sorted((CONFIG_ROOT / "train").glob("*.yaml")):
        cfg = load_train_config(path)
        assert cfg.stage in ("head", "full", "lora", "ssl"), path
    with pytest.raises(ValueError, match="unknown key"):
        load_train_config(TINY, ["optim.learning_rate=1"])
    with pytest.raises(ValueError, match="zero_stage"):
        load_train_config(TINY, ["zero_stage=4"])


def test_deepspeed_reads_the_config_as_the_run_means_it(monkeypatch):
    """DeepSpeed's own parser (not our dict) decides: batch arithmetic (it asserts train = micro x accumulation x
    world size), ZeRO stage, bf16, clipping, optimizer and schedule as DeepSpeed will run them."""
    import deepspeed.comm
    from deepspeed.runtime.config import DeepSpeedConfig

    from train.engine import deepspeed_config
    cfg = load_train_config(TINY, ["data.global_batch_size=24", "grad_accum_steps=3", "precision=bf16",
                                   "zero_stage=3", "max_steps=50", "optim.warmup_steps=10", "optim.grad_clip=0.7"])
    monkeypatch.setattr(deepspeed.comm, "get_rank", lambda *a, **k: 0)

    def parsed(world_size: int) -> DeepSpeedConfig:  # DeepSpeed asks deepspeed.comm for the world size
        monkeypatch.setattr(deepspeed.comm, "get_world_size", lambda *a, **k: world_size)
        return DeepSpeedConfig(deepspeed_config(cfg, world_size=2, on_cuda=False))
    ds = parsed(2)
    assert (ds.train_batch_size, ds.train_micro_batch_size_per_gpu, ds.gradient_accumulation_steps) == (24, 4, 3)
    assert ds.zero_optimization_stage == 3 and ds.bfloat16_config.enabled and ds.gradient_clipping == 0.7
    assert ds.optimizer_name == "adamw" and ds.optimizer_params["torch_adam"] and ds.optimizer_params["lr"] == 0.01
    assert ds.scheduler_name == "WarmupCosineLR"
    assert ds.scheduler_params["total_num_steps"] == 50 and ds.scheduler_params["warmup_num_steps"] == 10
    with pytest.raises(AssertionError, match=r"24 != 4 \* 3 \* 3"):  # the same JSON on another world size
        parsed(3)
    with pytest.raises(ValueError, match="divisible"):
        deepspeed_config(cfg, world_size=5, on_cuda=False)


@pytest.mark.floors  # bench/gpu.sh runs it on the GPU machine, whose torch/transformers/peft are the floors
def test_single_process_tiny_run_logs_checkpoints_and_exports(shard_root, tmp_path):
    import numpy as np
    import torch
    from models.io import load_export
    out = tmp_path / "run"
    printed = _run(_command(1, out, 4, _overrides(shard_root, checkpoint_every=2, val_every=2)))
    # tiny.yaml trains the head stage on a random backbone: the run says what that can and cannot learn.
    assert "stage 'head' freezes a randomly initialised backbone" in printed.stdout + printed.stderr
    steps = _steps(out)
    assert sorted(steps) == [1, 2, 3, 4]
    for record in steps.values():
        assert {"loss", "lr", "img_per_s", "data_wait_fraction", "survey_counts", "batch_keys_hash"} <= set(record)
        assert sum(record["survey_counts"].values()) == 12 and np.isfinite(record["loss"])
    validation = _events(out, "validation")
    assert [v["step"] for v in validation] == [2, 4]
    assert set(validation[-1]["surveys"]) == {"sdss", "decals", "hst"}
    assert "bar_yes" in validation[-1]["surveys"]["sdss"]["features"]
    meta = json.loads((out / "checkpoints" / "step00000004" / "meta.json").read_text())
    assert meta["sampler"]["samples_consumed"] == 48 and len(meta["schema"]) == 26 and meta["config"]["stage"]
    assert (out / "config.yaml").is_file() and (out / "deepspeed.json").is_file()
    assert any((out / "tensorboard").iterdir())
    model = load_export(out / "export")
    assert model.output_names[0] == "smooth-or-featured_smooth"
    with torch.no_grad():
        fractions = model.fractions(model(torch.zeros(2, 3, 56, 56)))
    assert torch.allclose(fractions[:, :3].sum(dim=1), torch.ones(2), atol=1e-5)
    # What evaluation needs: surveys pinned by manifest hash, the input pipeline, final validation, commit.
    from sharding.writer import sha256_of
    provenance = json.loads((out / "export" / "export.json").read_text())["metadata"]
    assert [s for s, _ in provenance["mix"]] == list(validation[-1]["surveys"])
    assert provenance["surveys"]["hst"]["manifest_sha256"] == sha256_of(shard_root / "hst" / "manifest.json")
    assert provenance["input"]["image_size"] == 56 and len(provenance["input"]["mean"]) == 3
    assert provenance["val_metrics"]["sdss"]["n"] == validation[-1]["surveys"]["sdss"]["n"]
    assert provenance["step"] == 4 and provenance["config"]["max_steps"] == 4



@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_torchrun_kill_and_resume_matches_uninterrupted(shard_root, tmp_path, zero_stage):
    overrides = _overrides(shard_root, checkpoint_every=3, zero_stage=zero_stage, **{"model_overrides": "[head.dropout=0.3]"})
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    _run(_command(2, reference, 8, overrides))
    _kill_after_checkpoint(_command(2, resumed, 8, overrides), resumed, "step00000003")
    _run(_command(2, resumed, 8, overrides, resume="auto"))
    ref, res = _steps(reference), _steps(resumed)
    assert sorted(res) == sorted(ref) == list(range(1, 9))
    for step in range(1, 9):
        assert res[step]["batch_keys_hash"] == ref[step]["batch_keys_hash"], step
        assert res[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-5, abs=1e-6), step
        assert res[step]["survey_counts"] == ref[step]["survey_counts"]


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_resume_continues(shard_root, tmp_path):
    overrides = _overrides(shard_root, checkpoint_every=1000)
    reference, preempted = tmp_path / "reference", tmp_path / "preempted"
    _run(_command(1, reference, 10, overrides))
    proc = subprocess.Popen(_command(1, preempted, 10, overrides), cwd=REPO, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = preempted / "log.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (log.exists() and len(_steps(preempted)) >= 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    saved = _events(preempted, "checkpoint")
    assert saved and saved[-1]["reason"] == "signal 15" and not (preempted / "export").exists()
    _run(_command(1, preempted, 10, overrides, resume="auto"))
    ref, res = _steps(reference), _steps(preempted)
    assert [res[s]["batch_keys_hash"] for s in range(1, 11)] == [ref[s]["batch_keys_hash"] for s in range(1, 11)]
    assert [res[s]["loss"] for s in range(1, 11)] == pytest.approx([ref[s]["loss"] for s in range(1, 11)], rel=1e-5)


def test_nan_loss_stops_with_step_and_keys(shard_root, tmp_path):
    cmd = _command(1, tmp_path / "nan", 6, _overrides(shard_root, **{"optim.lr": "1e30", "optim.warmup_steps": 0,
                                                                     "optim.grad_clip": 0}))
    result = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "loss is nan at step" in result.stderr.lower() and "batch keys" in result.stderr


@pytest.mark.slow
def test_lora_stage_in_bf16_trains_only_adapters_and_exports_merged_weights(shard_root, tmp_path):
    import torch
    from models.io import load_export
    out = tmp_path / "lora"
    _run(_command(1, out, 3, _overrides(shard_root, stage="lora", precision="bf16", zero_stage=2,
                                         **{"lora.rank": 4, "lora.alpha": 8.0})))
    steps = _steps(out)
    assert sorted(steps) == [1, 2, 3] and all(np.isfinite(s["loss"]) for s in steps.values())
    model = load_export(out / "export")  # merged: a plain Dinov2 backbone, no peft modules
    assert not any("lora_" in name for name, _ in model.named_parameters())
    with torch.no_grad():
        assert torch.isfinite(model(torch.zeros(1, 3, 56, 56))).all()
    meta = json.loads((out / "export" / "export.json").read_text())
    assert meta["metadata"]["stage"] == "lora"


def test_layer_decay_param_groups():
    from models.config import load_model_config
    from models.head import MorphologyModel
    from sharding.schema import load_schema
    from train.engine import param_groups
    cfg = load_train_config(TINY, ["stage=full", "optim.layer_decay=0.5", "optim.lr=1.0"])
    model = MorphologyModel(load_model_config("tiny"), load_schema())
    groups = param_groups(model, cfg, num_layers=2)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert lr_of[id(named["head.0.weight"])] == 1.0
    assert lr_of[id(named["backbone.encoder.layer.1.mlp.fc1.weight"])] == 0.5
    assert lr_of[id(named["backbone.encoder.layer.0.mlp.fc1.weight"])] == 0.25
    assert lr_of[id(named["backbone.embeddings.patch_embeddings.projection.weight"])] == 0.125
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert decay[id(named["head.0.bias"])] == 0.0 and decay[id(named["head.0.weight"])] > 0
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in model.parameters())


def test_head_stage_on_a_local_pretrained_folder_keeps_its_backbone(shard_root, tmp_path):
    """The real-weights path: a save_pretrained folder (here a saved random model) is loaded, frozen, exported."""
    import torch
    from safetensors.torch import load_file
    from transformers import Dinov2Model

    from models.backbone import dinov2_config
    from models.config import load_model_config

    torch.manual_seed(5)
    source = Dinov2Model(dinov2_config(load_model_config("tiny").backbone))
    source.save_pretrained(tmp_path / "dinov2-tiny")
    out = tmp_path / "run"
    printed = _run(_command(1, out, 2, _overrides(shard_root, stage="head")
                        + [f"model_overrides=[pretrained={tmp_path / 'dinov2-tiny'}]"]))
    assert "randomly initialised backbone" not in printed.stdout + printed.stderr
    exported = load_file(out / "export" / "model.safetensors")
    for name, tensor in source.state_dict().items():
        assert torch.equal(exported[f"backbone.{name}"], tensor), name
    meta = json.loads((out / "export" / "export.json").read_text())
    assert meta["pretrained_source"] == str(tmp_path / "dinov2-tiny") and meta["model"]["pretrained"] is None



def test_eval_refs_pad_gives_every_rank_the_same_number_of_rows():
    from types import SimpleNamespace

    from loaders.evaluation import eval_refs
    info = SimpleNamespace(shard_counts=[4, 3, 2])  # 9 samples
    for world_size in (1, 2, 4, 5, 12):
        plain = [eval_refs(info, r, world_size, None) for r in range(world_size)]
        padded = [eval_refs(info, r, world_size, None, pad=True) for r in range(world_size)]
        assert {len(p) for p in padded} == {-(-9 // world_size)}
        assert sum(len(p) for p in plain) == 9
        for mine, pad in zip(plain, padded):
            assert np.array_equal(pad[:len(mine)], mine)  # real rows first
            assert (pad[len(mine):] == [0, 0, 0]).all()
    assert len(eval_refs(info, 1, 2, 3, pad=True)) == 2 and len(eval_refs(info, 1, 2, 3)) == 1


def test_train_step_does_not_synchronise_the_host(monkeypatch):
    """No loss.item() or object gather, and one all-reduce per step (the global label count, on the device): the
    step queues work and returns."""
    from types import SimpleNamespace

    import torch
    import torch.distributed as dist

    from loaders.batch import Batch
    from models.config import load_model_config
    from models.head import MorphologyModel
    from sharding.schema import load_schema
    from train import loop
    from train.objective import SupervisedObjective
    from train.world import World

    model = MorphologyModel(load_model_config("tiny"), load_schema())
    engine = SimpleNamespace(module=model, train=model.train, device=torch.device("cpu"),
                             forward=lambda images: model(images, with_other=True),
                             backward_step=lambda loss: loss.backward())
    cfg = load_train_config(TINY, ["grad_accum_steps=2"])
    stats = None
    if hasattr(loop, "StepStats"):
        stats = loop.StepStats(torch.device("cpu"), 0, 1, ["sdss", "hst"])
    objective = SupervisedObjective(cfg, World(), load_schema(), model, 2)
    objective.attach(engine, print, print)
    run = SimpleNamespace(cfg=cfg, world=World(), engine=engine, step=0, stats=stats, objective=objective)
    n = 4
    batch = Batch(torch.randn(n, 3, 56, 56), torch.rand(n, 26), torch.ones(n, 26, dtype=torch.bool),
                  torch.ones(n, 26), torch.full((n, 9), 26.0), torch.tensor([0, 1, 0, 1]), list("abcd"))

    def forbidden(*args, **kwargs):
        raise AssertionError("host synchronisation in train_step")
    monkeypatch.setattr(torch.Tensor, "item", forbidden)
    monkeypatch.setattr(torch.Tensor, "tolist", forbidden)
    reduced = []
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, *a, **k: reduced.append(tensor.device))  # world of one
    monkeypatch.setattr(dist, "all_gather_object", forbidden)
    for step in range(3):
        loop.train_step(run, batch)
        run.step += 1
    assert reduced == [torch.device("cpu")] * 3  # the count, once per step (not per micro-batch), on the device


def test_step_stats_reduce_once_and_name_the_first_non_finite_step(process_group, monkeypatch):
    import torch
    import torch.distributed as dist

    from train.stepstats import NonFiniteLoss, StepStats
    calls = []
    real = dist.all_reduce
    monkeypatch.setattr(dist, "all_reduce", lambda *a, **k: calls.append(1) or real(*a, **k))
    stats = StepStats(torch.device("cpu"), 0, 1, ["sdss", "hst"])
    # Each micro-batch adds its share of the global batch loss; the step's loss is their sum over micro-batches.
    for step, losses in ((1, [1.0, 2.0]), (2, [1.0, float("nan")]), (3, [float("inf"), 1.0])):
        stats.start_step()
        for value in losses:
            stats.add(step, torch.tensor(value))
        stats.end_step(step, [f"k{step}a", f"k{step}b"], torch.tensor([0, 1]))
        if step == 1:
            reduced = stats.reduce()
            assert calls == [1] and reduced["loss"] == 3.0 and reduced["survey_counts"] == {"sdss": 1, "hst": 1}
    with pytest.raises(NonFiniteLoss, match=r"loss is nan at step 2 \(rank 0 batch keys: \['k2a', 'k2b'\]\)"):
        stats.reduce()


def test_batch_keys_hash_is_the_same_for_any_split_of_the_batch():
    from train.runlog import key_lanes, keys_hash
    keys = [f"sdss_{i}" for i in range(24)]
    whole = keys_hash(key_lanes(keys))
    for parts in (2, 3, 4, 8):
        lanes = [key_lanes(keys[i::parts]) for i in range(parts)]
        assert keys_hash((sum(a for a, _ in lanes), sum(b for _, b in lanes))) == whole
    assert keys_hash(key_lanes(keys[:-1] + ["sdss_99"])) != whole


@pytest.mark.slow
def test_log_records_the_base_lr_and_every_group_lr(shard_root, tmp_path):
    out = tmp_path / "run"
    _run(_command(1, out, 3, _overrides(shard_root, stage="full", **{"optim.layer_decay": 0.5, "optim.lr": 0.01,
                                                                      "optim.warmup_steps": 2})))
    record = _steps(out)[3]  # after warm-up: the base lr is the configured one on the cosine
    groups = record["lr_groups"]
    assert record["lr"] == pytest.approx(groups["top"]) and 0 < record["lr"] <= 0.01
    for depth in range(3):  # embeddings (0) and the two encoder layers: lr * 0.5 ** (3 - depth)
        assert groups[f"depth{depth}"] == pytest.approx(record["lr"] * 0.5 ** (3 - depth)), depth
        assert groups[f"depth{depth}_no_decay"] == pytest.approx(groups[f"depth{depth}"])


def test_optimizer_is_torch_adamw_on_gpu_unless_asked_otherwise():
    from train.engine import deepspeed_config
    cfg = load_train_config(TINY)
    for on_cuda in (False, True):
        params = deepspeed_config(cfg, 1, on_cuda=on_cuda)["optimizer"]["params"]
        assert params["torch_adam"] is True and params.get("fused", False) is on_cuda
    fused = load_train_config(TINY, ["optim.implementation=deepspeed_fused"])
    assert "torch_adam" not in deepspeed_config(fused, 1, on_cuda=True)["optimizer"]["params"]
    zero3 = load_train_config(TINY, ["zero_stage=3", "zero3_param_persistence_threshold=0"])
    ds = deepspeed_config(zero3, 1, on_cuda=False, load_universal=True)
    assert ds["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    assert ds["checkpoint"] == {"load_universal": True}


def test_deepspeed_builds_torch_adamw_with_the_fused_flag():
    """DeepSpeed passes the optimizer params it does not know (fused) to torch.optim.AdamW."""
    script = f"""
import torch, deepspeed
from train.config import load_train_config
from train.engine import deepspeed_config
cfg = load_train_config({TINY!r}, ["data.global_batch_size=4"])
config = deepspeed_config(cfg, 1, on_cuda=True)
deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
model = torch.nn.Linear(3, 2)
engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
inner = getattr(optimizer, "optimizer", optimizer)
print(type(inner).__name__, inner.param_groups[0]["fused"])
"""
    env = dict(_env(), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "AdamW True"
