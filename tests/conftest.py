"""Shared pytest fixtures: offline hub, GPU skipping, tiny mock surveys built once per session."""

import os

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
