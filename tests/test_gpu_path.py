"""The GPU path without DALI: `--backend auto` falls back to torch (and says so), an explicit `--backend dali` is
refused with the fix, and on a GPU (marked gpu) prediction and training run on CUDA with or without DALI."""

import builtins
import sys

import numpy as np
import pandas as pd
import pytest

from loaders.evaluation import choose_backend, dali_unavailable


@pytest.fixture
def no_dali(monkeypatch):
    """This process as a machine without the DALI wheel: importing nvidia.dali fails as it would there."""
    real_import = builtins.__import__

    def blocked(name, *args, **kwargs):
        if name == "nvidia.dali" or name.startswith("nvidia.dali."):
            raise ModuleNotFoundError("No module named 'nvidia.dali'", name=name)
        return real_import(name, *args, **kwargs)
    for module in [m for m in sys.modules if m == "loaders.dali" or m.startswith("nvidia.dali")]:
        monkeypatch.delitem(sys.modules, module)
    monkeypatch.setattr(builtins, "__import__", blocked)


def test_auto_backend_is_torch_without_dali_even_on_cuda(no_dali):
    assert "nvidia.dali" in dali_unavailable()
    backend, why = choose_backend("auto", "cuda")
    assert backend == "torch" and "DALI is not importable" in why
    assert choose_backend("auto", "cpu") == ("torch", "no CUDA device")
    assert choose_backend("torch", "cuda") == ("torch", "asked for")
    with pytest.raises(ValueError, match=r"--backend dali needs nvidia-dali-cuda120 .*--backend torch"):
        choose_backend("dali", "cuda")


def test_auto_backend_is_dali_on_cuda_where_dali_imports():
    pytest.importorskip("nvidia.dali", reason="the DALI wheel (the gpu extra) is not installed here")
    assert dali_unavailable() is None
    assert choose_backend("auto", "cuda") == ("dali", "CUDA device and DALI installed")
    assert choose_backend("auto", "cpu")[0] == "torch"


def test_predict_says_which_backend_it_chose(shard_root, tmp_path, capsys, no_dali):
    from eval import predict
    from eval_cases import make_export
    export = make_export(tmp_path / "export", shard_root, "sdss=1.0", seed=1)
    out = tmp_path / "p.parquet"
    assert predict.main(["--model", str(export), "--shards", str(shard_root), "--surveys", "hst", "--split", "test",
                         "--out", str(out), "--device", "cpu", "--batch-size", "8"]) == 0
    assert "decoding with the torch backend on cpu (no CUDA device)" in capsys.readouterr().err
    assert len(pd.read_parquet(out)) > 0


@pytest.mark.gpu
def test_predict_on_cuda_without_dali_matches_the_cpu(shard_root, tmp_path, capsys, no_dali):
    from eval import predict
    from eval_cases import make_export
    from sharding.schema import load_schema
    export = make_export(tmp_path / "export", shard_root, "sdss=1.0", seed=1)
    frames = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / f"{device}.parquet"
        assert predict.main(["--model", str(export), "--shards", str(shard_root), "--surveys", "sdss,hst",
                             "--split", "all", "--out", str(out), "--device", device, "--batch-size", "16"]) == 0
        frames[device] = pd.read_parquet(out)
    assert "decoding with the torch backend on cuda (DALI is not importable" in capsys.readouterr().err
    names = load_schema().names
    assert frames["cpu"]["key"].tolist() == frames["cuda"]["key"].tolist()
    # TF32 convolutions on the GPU round the patch embedding: fractions agree to a few 1e-3, not bit for bit.
    np.testing.assert_allclose(frames["cuda"][names].to_numpy(), frames["cpu"][names].to_numpy(), atol=5e-3)


@pytest.mark.gpu
def test_training_on_cuda_in_bf16_follows_the_cpu_run(shard_root, tmp_path):
    """One process on the GPU (NCCL, bf16 autocast by DeepSpeed) against fp32 on the CPU: the same batches, the
    same first loss to bf16 precision, finite losses and an export."""
    from train_cases import _command, _overrides, _run, _steps
    overrides = _overrides(shard_root, loss="mse")
    runs = {"cpu": (tmp_path / "cpu", ["device=cpu"]), "cuda": (tmp_path / "cuda", ["device=cuda", "precision=bf16"])}
    for out, extra in runs.values():
        _run(_command(1, out, 4, [*overrides, *extra]))
    cpu, cuda = _steps(runs["cpu"][0]), _steps(runs["cuda"][0])
    assert [cuda[s]["batch_keys_hash"] for s in cuda] == [cpu[s]["batch_keys_hash"] for s in cpu]
    assert cuda[1]["loss"] == pytest.approx(cpu[1]["loss"], rel=2e-2)
    assert all(np.isfinite(r["loss"]) for r in cuda.values())
    assert (runs["cuda"][0] / "export" / "export.json").is_file()
