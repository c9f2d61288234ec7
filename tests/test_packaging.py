"""An installed wheel (not the source tree) finds its built-in configs and runs from another folder."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], cwd: Path, env: dict) -> str:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


@pytest.mark.slow
def test_an_installed_wheel_mocks_builds_and_trains_from_another_folder(tmp_path):
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
          str(REPO)], REPO, dict(os.environ))
    wheel = next(wheels.glob("galaxy_sommelier-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for needed in ("sommelier_configs/surveys/sdss.yaml", "sommelier_configs/features/standard26.yaml",
                   "sommelier_configs/models/tiny.yaml", "sommelier_configs/train/tiny.yaml",
                   "sharding/gz_schemas/cross_survey_26_features.csv", "eval/predict.py"):
        assert needed in names, needed
    site = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)], REPO,
         dict(os.environ))
    work = tmp_path / "elsewhere"
    work.mkdir()
    # The installed copy comes first on the path: the source tree's editable install must not be what runs.
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    where = _run([sys.executable, "-c", "import sharding, sommelier_configs; print(sharding.__file__); "
                  "print(sommelier_configs.__file__)"], work, env)
    assert all(line.startswith(str(site)) for line in where.split())
    _run([sys.executable, "-m", "sharding.mock", "--survey", "sdss", "--num-galaxies", "30", "--out", "raw",
          "--no-progress"], work, env)
    _run([sys.executable, "-m", "sharding.build", "--survey", "sdss", "--catalog", "raw/gz2_hart16.csv", "--images",
          "raw/images", "--out", "shards", "--image-size", "32", "--no-progress"], work, env)
    _run([sys.executable, "-m", "train", "--config", "tiny", "--out-dir", "run", "--max-steps", "1",
          "data.mix=sdss=1.0", "data.loader.shard_root=shards", "data.loader.image_size=32",
          "data.global_batch_size=4", "data.val_max_samples=4", "val_every=100", "checkpoint_every=100"], work, env)
    assert (work / "run" / "export" / "model.safetensors").is_file()
    (work / "configs" / "surveys").mkdir(parents=True)  # a user's own survey overlays the built-in ones by name
    (work / "configs" / "surveys" / "mine.yaml").write_text(
        (REPO / "configs" / "surveys" / "sdss.yaml").read_text().replace("name: sdss", "name: mine", 1))
    listed = _run([sys.executable, "-c", "from sharding.registry import list_surveys; print(list_surveys())"], work, env)
    assert "'mine'" in listed and "'sdss'" in listed
