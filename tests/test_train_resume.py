"""Training resumes and exports under DeepSpeed: another world size, refused resumes, checkpoints complete or absent,
fp32 master weights in bf16 exports, ZeRO-3 validation with uneven ranks."""

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from train.config import load_train_config
from train_cases import (REPO, TINY, _command, _env, _events, _overrides, _pretrained_tiny, _run, _run_status,
                         _steps, free_port)


@pytest.mark.slow
@pytest.mark.parametrize("saved_nproc, resumed_nproc, zero_stage, stage", [(2, 1, 3, "head"), (1, 2, 2, "full")])
def test_resume_on_another_world_size_follows_the_uninterrupted_run(shard_root, tmp_path, saved_nproc,
                                                                    resumed_nproc, zero_stage, stage):
    """A checkpoint of N processes resumed by M: DeepSpeed's universal form, converted once, loaded by M.

    With dropout on and the masked MSE (whose label count differs between ranks, since surveys lack features):
    the objective and the dropout masks do not depend on the world size, so the resumed run follows the other."""
    import shutil
    overrides = _overrides(shard_root, checkpoint_every=3, zero_stage=zero_stage, stage=stage, loss="mse",
                           **{"model_overrides": "[head.dropout=0.3,backbone.drop_path_rate=0.2]"})
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    _run(_command(saved_nproc, reference, 6, overrides))
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(reference / "checkpoints" / "step00000003", resumed / "checkpoints" / "step00000003")
    result = _run(_command(resumed_nproc, resumed, 6, overrides, resume="auto"))
    assert f"converted from {saved_nproc} processes" in result.stdout + result.stderr
    assert (resumed / "checkpoints" / "step00000003_universal").is_dir()
    ref, res = _steps(reference), _steps(resumed)
    assert sorted(res) == [4, 5, 6]
    for step in (4, 5, 6):
        assert res[step]["batch_keys_hash"] == ref[step]["batch_keys_hash"], step
        assert res[step]["survey_counts"] == ref[step]["survey_counts"], step
        assert res[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-5, abs=1e-6), step


@pytest.mark.slow
def test_the_loss_is_the_same_on_any_world_size_and_accumulation(shard_root, tmp_path):
    """1 process vs 2 processes x 2 micro-batches, every step: the same global batches, the same objective (summed
    over the global batch's labels / their global count) and the same per-sample dropout, so the same losses and
    gradient norms to float tolerance (the summation order differs), not merely the same batches."""
    overrides = _overrides(shard_root, stage="full", loss="mse",
                           **{"model_overrides": "[head.dropout=0.3,backbone.drop_path_rate=0.2,"
                                                 "backbone.hidden_dropout_prob=0.1]"})
    one, two = tmp_path / "one", tmp_path / "two"
    _run(_command(1, one, 10, overrides))
    _run(_command(2, two, 10, [*overrides, "grad_accum_steps=2"]))
    a, b = _steps(one), _steps(two)
    assert sorted(a) == sorted(b) == list(range(1, 11))
    for step in a:
        assert a[step]["batch_keys_hash"] == b[step]["batch_keys_hash"], step
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-4), step
        assert b[step]["grad_norm"] == pytest.approx(a[step]["grad_norm"], rel=1e-4), step


def test_resume_planning_refuses_what_cannot_be_resumed(tmp_path):
    """Stage 0 on another world size, another schema or model: a ValueError naming it, before any step."""
    from train.checkpoint import plan_resume
    identity = {"schema": ["a", "b"], "model": {"backbone": {"hidden_size": 64}}, "stage": "head", "lora": None}
    folder = tmp_path / "checkpoints" / "step00000003"
    folder.mkdir(parents=True)
    (folder / "meta.json").write_text(json.dumps({"step": 3, "sampler": {}, "world_size": 2, **identity}))
    assert plan_resume(tmp_path, "auto", identity, world_size=2, zero_stage=0).universal is False
    plan = plan_resume(tmp_path, "step00000003", identity, world_size=1, zero_stage=1)
    assert plan.universal and plan.step == 3 and plan.saved_world_size == 2
    with pytest.raises(ValueError, match="written by 2 processes.*zero_stage=0"):
        plan_resume(tmp_path, "auto", identity, world_size=1, zero_stage=0)
    with pytest.raises(ValueError, match=r"schema: missing \['b'\] added \['c'\]"):
        plan_resume(tmp_path, "auto", {**identity, "schema": ["a", "c"]}, world_size=2, zero_stage=2)
    with pytest.raises(ValueError, match="model.backbone.hidden_size: 64 -> 32"):
        plan_resume(tmp_path, "auto", {**identity, "model": {"backbone": {"hidden_size": 32}}}, 2, 2)
    assert plan_resume(tmp_path, "none", identity, 1, 0) is None


def test_resume_of_a_different_model_fails_before_loading(shard_root, tmp_path):
    out = tmp_path / "run"
    folder = out / "checkpoints" / "step00000002"
    folder.mkdir(parents=True)
    from models.config import load_model_config
    from sharding.config import to_dict
    from sharding.schema import load_schema
    saved_model = to_dict(load_model_config("tiny", ["backbone.hidden_size=32"]))
    (folder / "meta.json").write_text(json.dumps({"step": 2, "sampler": {}, "world_size": 1, "model": saved_model,
                                                  "schema": load_schema().names, "stage": "head"}))
    result = _run_status(_command(1, out, 4, _overrides(shard_root), resume="auto"))
    assert result.returncode == 2, result.stderr[-3000:]
    assert "different model" in result.stderr and "model.backbone.hidden_size: 32 -> 64" in result.stderr
    assert not (out / "log.jsonl").exists() or not _steps(out)


@pytest.mark.slow
def test_signal_at_a_checkpoint_step_does_not_rewrite_that_checkpoint(shard_root, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(_command(1, out, 40, _overrides(shard_root, checkpoint_every=1, keep_checkpoints=100)),
                            cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not ((out / "log.jsonl").exists() and len(_steps(out)) >= 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output[-3000:]
    saved = [e["step"] for e in _events(out, "checkpoint")]
    assert saved and len(saved) == len(set(saved)), saved  # every step's checkpoint written once
    assert "checkpoint already saved at step" in output
    root = out / "checkpoints"
    assert not list(root.glob("partial-*"))
    assert sorted(p.name for p in root.glob("step*")) == [f"step{s:08d}" for s in saved]
    assert all((root / f"step{s:08d}" / "meta.json").is_file() for s in saved)


class _FakeCheckpointEngine:
    """Writes one file per save, or dies half-way (a node lost mid-save)."""

    def __init__(self):
        self.saves, self.fail = [], False

    def save(self, directory: Path, tag: str, client_state: dict) -> None:
        self.saves.append(tag)
        (directory / tag).mkdir(parents=True, exist_ok=True)
        (directory / tag / "state.json").write_text(json.dumps(client_state))
        if self.fail:
            raise RuntimeError("lost a node")

    def load(self, directory: Path, tag: str) -> dict:
        return json.loads((directory / tag / "state.json").read_text())


def test_checkpoint_is_complete_or_absent_and_written_once_per_step(tmp_path, process_group):
    from train.checkpoint import Checkpointer, ResumePlan, complete_tags
    from train.world import World
    engine, events = _FakeCheckpointEngine(), []
    checkpointer = Checkpointer(engine, tmp_path, World(), keep=5, meta={"world_size": 1},
                                convert=lambda a, b: None, on_event=events.append)
    assert checkpointer.save(3, {"step": 3, "sampler": {"at": 3}}, "periodic")
    assert not checkpointer.save(3, {"step": 3, "sampler": {"at": 3}}, "signal 15")  # no rewrite in place
    assert engine.saves == ["partial-step00000003"] and [e["reason"] for e in events] == ["periodic"]
    engine.fail = True
    with pytest.raises(RuntimeError, match="lost a node"):
        checkpointer.save(4, {"step": 4, "sampler": {"at": 4}}, "periodic")
    assert complete_tags(tmp_path) == ["step00000003"] and not (tmp_path / "checkpoints" / "step00000004").exists()
    engine.fail = False  # resumed from step 3, the run saves step 4 again: the leftovers go, the new one is whole
    checkpointer = Checkpointer(engine, tmp_path, World(), keep=5, meta={"world_size": 1},
                                convert=lambda a, b: None, on_event=events.append)
    assert checkpointer.load(ResumePlan("step00000003", 3, 1, False)) == {"step": 3, "sampler": {"at": 3}}
    assert checkpointer.save(4, {"step": 4, "sampler": {"at": 4}}, "periodic")
    assert complete_tags(tmp_path) == ["step00000003", "step00000004"]
    assert not list((tmp_path / "checkpoints").glob("partial-*"))
    meta = json.loads((tmp_path / "checkpoints" / "step00000004" / "meta.json").read_text())
    assert meta["step"] == 4 and meta["sampler"] == {"at": 4} and meta["world_size"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage, stage", [(0, "full"), (2, "head"), (3, "head"), (2, "lora")],
                         ids=["zero0-full", "zero2-head", "zero3-head", "zero2-lora"])
def test_bf16_export_is_the_fp32_master_weights(shard_root, tmp_path, zero_stage, stage):
    """Trainable weights: the checkpoint's fp32 masters; frozen ones: their original fp32 values (not bf16)."""
    import torch
    from safetensors.torch import load_file
    from train import stages

    pretrained = tmp_path / "dinov2-tiny"
    original = {f"backbone.{k}": v for k, v in _pretrained_tiny(pretrained).items()}
    out = tmp_path / "run"
    extra = [f"model_overrides=[pretrained={pretrained}]"]
    # DeepSpeed makes the fp32 masters from the bf16-cast module: they leave the bf16 grid once lr > 0.
    _run(_command(1, out, 3, _overrides(shard_root, stage=stage, precision="bf16", zero_stage=zero_stage,
                                        **{"lora.rank": 4, "lora.alpha": 8.0, "optim.warmup_steps": 1}) + extra))
    exported = load_file(out / "export" / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in exported.values())
    cfg = load_train_config(TINY, [*_overrides(shard_root, stage=stage, **{"lora.rank": 4, "lora.alpha": 8.0}), *extra])
    from sharding.schema import load_schema
    model, _ = stages.build(cfg, load_schema())  # the stage's model, frozen weights at their fp32 originals
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    checkpoint = out / "checkpoints" / "step00000003"
    if zero_stage == 0:  # DeepSpeed's bf16 wrapper keeps the fp32 masters in the optimizer state
        saved = torch.load(checkpoint / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        masters = [t for group in saved["optimizer"]["fp32_groups"] for t in group]
        for name in trainable:
            assert any(m.shape == exported[name].shape and torch.equal(m, exported[name]) for m in masters), name
        master = {name: exported[name] for name in trainable}
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        gathered = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"), tag="step00000003")
        master = {name: gathered[name] for name in trainable}
    assert any(not torch.equal(t, t.bfloat16().float()) for t in master.values()), "masters look bf16-rounded"
    if stage == "lora":  # merge the fp32 adapters into the fp32 frozen weights, then compare
        from models.lora import merge_lora
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in trainable:
                    param.copy_(master[name])
        expected = merge_lora(model).state_dict()
        assert set(expected) == set(exported)
        for name, tensor in expected.items():
            assert torch.allclose(exported[name], tensor, rtol=1e-6, atol=1e-7), name
        untouched = [n for n in original if "q_proj" not in n and "v_proj" not in n]
        assert untouched and all(torch.equal(exported[n], original[n]) for n in untouched)
        return
    for name, tensor in exported.items():
        expected = master[name] if name in trainable else original[name]
        assert torch.equal(tensor, expected), name


@pytest.mark.slow
def test_zero3_validation_with_partitioned_parameters_and_uneven_ranks(shard_root, tmp_path):
    """decals val has 9 galaxies: with batches of 2, rank 0 has 3 batches and rank 1 two (plus one padded)."""
    overrides = _overrides(shard_root, val_at_start="true", **{"data.val_batch_size": 2})
    single, sharded = tmp_path / "single", tmp_path / "zero3"
    _run(_command(1, single, 1, overrides))
    result = _run(_command(2, sharded, 1, overrides + ["zero_stage=3", "zero3_param_persistence_threshold=0"]),
                  timeout=240)
    assert "all_gather_into_tensor` is deprecated" not in result.stdout + result.stderr
    ref, res = _events(single, "validation")[0], _events(sharded, "validation")[0]
    assert ref["step"] == res["step"] == 0
    sizes = {s: json.loads((shard_root / s / "manifest.json").read_text())["splits"]["val"]["num_samples"]
             for s in ("sdss", "decals", "hst")}
    assert sizes["decals"] % 2 == 1 and {s: r["n"] for s, r in res["surveys"].items()} == sizes
    for survey, values in ref["surveys"].items():
        for key in ("loss", "mae", "r"):
            assert res["surveys"][survey][key] == pytest.approx(values[key], rel=1e-4, abs=1e-6), (survey, key)


def test_main_ends_the_process_group_it_joined_and_leaves_a_callers(shard_root, tmp_path, monkeypatch):
    """Gloo's threads left to interpreter exit can abort a rank after its work is saved (SIGABRT, "terminate called
    without an active exception", seen in CI): main ends the group it joined, and only that one."""
    import torch.distributed as dist

    from train.__main__ import main
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    args = ["--config", TINY, "--max-steps", "1", *_overrides(shard_root, val_every=1000)]
    assert main([*args, "--out-dir", str(tmp_path / "own")]) == 0
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        assert main([*args, "--out-dir", str(tmp_path / "callers")]) == 0
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()
