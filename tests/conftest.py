"""Shared pytest fixtures: offline hub, GPU skipping, tiny mock surveys built once per session."""

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    try:
        import torch
        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def mock_surveys(tmp_path_factory):
    """Small mock surveys with corrupt inputs, generated once per test session by the real generator."""
    from sharding.mock import main as mock_main

    root = tmp_path_factory.mktemp("raw")
    made = {}
    for name, survey, num, corrupt in [("sdss_corrupt", "sdss", 60, 0.2), ("hst_corrupt", "hst", 40, 0.2)]:
        out = root / name
        args = ["--survey", survey, "--num-galaxies", str(num), "--out", str(out), "--seed", "1",
                "--corrupt-fraction", str(corrupt)]
        assert mock_main(args) == 0
        made[name] = out
    return made


@pytest.fixture(scope="session")
def shard_root(tmp_path_factory):
    """A shard root with clean sdss, decals and hst mock surveys (64 px JPEG, 8 samples per shard)."""
    from sharding import build
    from sharding.mock import main as mock_main
    from sharding.registry import load_survey

    raw_root = tmp_path_factory.mktemp("raw_clean")
    root = tmp_path_factory.mktemp("shards_clean")
    for survey, num in [("sdss", 72), ("decals", 72), ("hst", 60)]:
        raw = raw_root / survey
        assert mock_main(["--survey", survey, "--num-galaxies", str(num), "--out", str(raw), "--seed", "3"]) == 0
        catalog = raw / Path(load_survey(survey).catalog).name
        args = ["--survey", survey, "--catalog", str(catalog), "--images", str(raw / "images"), "--out", str(root),
                "--image-size", "64", "--samples-per-shard", "8", "--no-progress"]
        assert build.main(args) == 0
    return root


@pytest.fixture(scope="session")
def eval_shards(tmp_path_factory):
    """(raw root, shard root) of mock sdss, decals, hst and ukidss (ukidss with corrupt inputs), 64 px shards."""
    from eval_cases import make_shard_root

    raw, root = tmp_path_factory.mktemp("eval_raw"), tmp_path_factory.mktemp("eval_shards")
    make_shard_root(raw, root)
    return raw, root


@pytest.fixture(scope="session")
def eval_exports(eval_shards, tmp_path_factory):
    """Exports of an SDSS-only and a triple-mix tiny model (random weights, training's provenance)."""
    from eval_cases import make_export

    folder = tmp_path_factory.mktemp("eval_exports")
    root = eval_shards[1]
    return {"sdss_only": make_export(folder / "sdss_only", root, "sdss=1.0", seed=1),
            "mixed": make_export(folder / "mixed", root, "sdss=0.33,decals=0.33,hst=0.34", seed=2)}


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A private 2-node SLURM cluster (munge, slurmctld, two slurmd) on this machine; skipped where it cannot run."""
    from slurm_cluster import Cluster, unavailable

    reason = unavailable()
    if reason:
        pytest.skip(reason)
    cluster = Cluster(tmp_path_factory.mktemp("slurm"))
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture
def process_group():
    """torch.distributed in this process: a world of one over gloo (the collectives of unit-tested parts)."""
    import torch.distributed as dist

    from train.world import free_port
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory):
    """An empty, migrated SQLite MLflow store: a new one costs seconds of schema migrations, a copy nothing. Returns
    a function that copies it to a new file and gives that file's tracking URI."""
    import shutil

    registry = pytest.importorskip("launch.registry")
    folder = tmp_path_factory.mktemp("mlflow_template")
    registry.open_store(f"sqlite:///{folder}/mlflow.db")

    def new_store_uri(where) -> str:
        where.mkdir(parents=True, exist_ok=True)
        shutil.copy(folder / "mlflow.db", where / "mlflow.db")
        return f"sqlite:///{where}/mlflow.db"

    return new_store_uri
