"""Shared set-up of the evaluation tests: a four-survey shard root and model exports with real provenance."""

from pathlib import Path

import torch

from models.config import load_model_config
from models.head import MorphologyModel
from models.io import save_export
from sharding import build
from sharding.config import CONFIG_ROOT
from sharding.mock import main as mock_main
from sharding.registry import load_survey
from train.config import load_train_config
from train.stages import provenance

SURVEYS = {"sdss": 40, "decals": 40, "hst": 32, "ukidss": 40}
INPUT_SIZE = 32


def make_shard_root(raw_root: Path, shard_root: Path) -> None:
    """Mock surveys (ukidss with corrupt inputs) built into 64 px shards of 8 samples."""
    for survey, num in SURVEYS.items():
        raw = raw_root / survey
        corrupt = "0.15" if survey == "ukidss" else "0"
        assert mock_main(["--survey", survey, "--num-galaxies", str(num), "--out", str(raw), "--seed", "3",
                          "--corrupt-fraction", corrupt, "--no-progress"]) == 0
        catalog = raw / Path(load_survey(survey).catalog).name
        assert build.main(["--survey", survey, "--catalog", str(catalog), "--images", str(raw / "images"),
                           "--out", str(shard_root), "--image-size", "64", "--samples-per-shard", "8",
                           "--no-progress"]) == 0


def make_export(folder: Path, shard_root: Path, mix: str, seed: int, dropout: float = 0.1,
                loss: str = "dirichlet") -> Path:
    """A randomly initialised tiny model saved the way training exports it (same provenance fields)."""
    cfg = load_train_config(CONFIG_ROOT / "train" / "tiny.yaml",
                            [f"data.mix={mix}", f"data.loader.shard_root={shard_root}",
                             f"data.loader.image_size={INPUT_SIZE}", f"loss={loss}"])
    torch.manual_seed(seed)
    model = MorphologyModel(load_model_config(cfg.model, [f"head.dropout={dropout}"]))
    return save_export(model, folder, metadata=provenance(cfg, step=0))
