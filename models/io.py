"""A consolidated model export: safetensors weights + JSON config and schema, loadable without pickles; and the
backbone alone as a plain transformers DINOv2 folder that loads anywhere."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import Dinov2Model

from models.config import ModelConfig
from models.head import MorphologyModel
from models.lora import is_lora, merge_lora
from sharding.config import from_dict, to_dict
from sharding.schema import Feature, FeatureSchema, Question

EXPORT_FORMAT = "galaxy-sommelier-morphology-model"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "export.json"
BACKBONE_DIR = "backbone"  # <export>/backbone: Dinov2Model.from_pretrained + AutoImageProcessor.from_pretrained
PREPROCESSOR_FILE = "preprocessor_config.json"
PIL_BILINEAR = 2  # PIL.Image.Resampling.BILINEAR, as transformers' processor configs spell it


def schema_to_dict(schema: FeatureSchema) -> dict:
    return {"name": schema.name, "version": schema.version,
            "questions": [{"name": q.name, "text": q.text,
                           "features": [{"name": f.name, "answer": f.answer, "mapping": f.mapping, "note": f.note}
                                        for f in q.features]} for q in schema.questions]}


def schema_from_dict(data: dict) -> FeatureSchema:
    questions = [Question(q["name"], [Feature(**f) for f in q["features"]], q.get("text", ""))
                 for q in data["questions"]]
    return FeatureSchema(data["name"], data["version"], questions)


def export_state_dict(model: MorphologyModel) -> dict[str, torch.Tensor]:
    """The model's weights as plain tensors, LoRA adapters merged into a copy (the model itself is untouched)."""
    if is_lora(model):
        model = merge_lora(copy.deepcopy(model))
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}


def save_export(model: MorphologyModel, folder: str | Path, state_dict: dict[str, torch.Tensor] | None = None,
                metadata: dict | None = None) -> Path:
    """Write `folder`/model.safetensors and export.json (config, schema, output names, metadata).

    `state_dict` replaces the model's own weights, e.g. a ZeRO-3 checkpoint gathered to fp32; its keys must be
    the plain (merged) model's. The config is saved with `pretrained` cleared, so loading needs no other folder.
    """
    if state_dict is None:
        weights = export_state_dict(model)
    else:
        if is_lora(model):
            raise ValueError("a state_dict export needs the plain model: merge_lora(model) first")
        weights = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
        expected = set(model.state_dict())
        if set(weights) != expected:
            raise ValueError(f"state_dict keys do not match the model: missing {sorted(expected - set(weights))[:5]}, "
                             f"unexpected {sorted(set(weights) - expected)[:5]}")
    config = to_dict(model.config)
    config["pretrained"] = None
    meta = {"format": EXPORT_FORMAT, "format_version": FORMAT_VERSION, "model": config,
            "pretrained_source": model.config.pretrained, "schema": schema_to_dict(model.schema),
            "output_names": model.output_names, "other_questions": list(model.layout.other_questions),
            "metadata": metadata or {}}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(weights, folder / WEIGHTS_FILE, metadata={"format": EXPORT_FORMAT})
    (folder / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return folder


def read_export_meta(folder: str | Path) -> dict:
    folder = Path(folder)
    if not (folder / META_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise ValueError(f"{folder} is not a model export: it needs {META_FILE} and {WEIGHTS_FILE}")
    meta = json.loads((folder / META_FILE).read_text())
    if meta.get("format") != EXPORT_FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{folder / META_FILE}: format {meta.get('format')!r} v{meta.get('format_version')}, "
                         f"expected {EXPORT_FORMAT!r} v{FORMAT_VERSION}")
    return meta


def load_export(folder: str | Path, device: str | torch.device = "cpu") -> MorphologyModel:
    """A MorphologyModel in eval mode from `save_export`'s folder; outputs named by the saved schema."""
    meta = read_export_meta(folder)
    config = from_dict(ModelConfig, meta["model"], where=str(Path(folder) / META_FILE))
    schema = schema_from_dict(meta["schema"])
    # The meta device skips a random init that the saved weights would overwrite.
    with torch.device("meta"):
        model = MorphologyModel(config, schema)
    model.load_state_dict(load_file(Path(folder) / WEIGHTS_FILE, device=str(device)), strict=True, assign=True)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()]), "export left tensors unloaded"
    assert model.output_names == meta["output_names"]
    return model.eval()


def preprocessor_config(image_size: int, mean, std) -> dict:
    """transformers' BitImageProcessor settings (DINOv2's processor) that make the loaders' evaluation input.

    facebook/dinov2-* resize the shortest edge to 256 and centre-crop 224, bicubic; our loaders resize the whole
    cutout to image_size x image_size, bilinear, without a crop, then normalise 0..1 pixels by `mean` and `std`.
    A cutout already at image_size comes out as our input to float tolerance; any other size is resampled by
    PIL's or torchvision's filter instead of our antialiased warp, a few grey levels apart (tests/test_exports.py).
    """
    size = {"height": int(image_size), "width": int(image_size)}
    return {"image_processor_type": "BitImageProcessor", "do_convert_rgb": True,
            "do_resize": True, "size": size, "resample": PIL_BILINEAR, "do_center_crop": False, "crop_size": size,
            "do_rescale": True, "rescale_factor": 1 / 255,
            "do_normalize": True, "image_mean": [float(m) for m in mean], "image_std": [float(s) for s in std]}


def save_backbone(backbone: Dinov2Model, folder: str | Path, *, image_size: int, mean, std) -> Path:
    """`folder` as a plain DINOv2: config.json + model.safetensors (fp32) + preprocessor_config.json.

    `Dinov2Model.from_pretrained(folder)` and `AutoImageProcessor.from_pretrained(folder)` load it without this
    project, and `model_overrides=[pretrained=<folder>]` starts a stage from it. `image_size`, `mean` and `std`
    are the run's loader settings (mean and std on 0..1 pixels). The weights go into a fresh CPU fp32 Dinov2Model,
    so a bf16 or GPU backbone (an SSL teacher) saves the same way, and the modules training swaps in (per-sample
    dropout) never reach the folder.
    """
    if not isinstance(backbone, Dinov2Model):
        raise ValueError(f"save_backbone needs a plain Dinov2Model, got {type(backbone).__name__}; "
                         "fold LoRA adapters in first (models.lora.merge_lora)")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need one value per RGB channel, got {list(mean)} and {list(std)}")
    weights = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in backbone.state_dict().items()}
    config = copy.deepcopy(backbone.config)
    config.dtype = torch.float32
    with torch.device("meta"):  # the weights below replace every tensor; no random init to throw away
        plain = Dinov2Model(config)
    plain.load_state_dict(weights, strict=True, assign=True)
    assert not any(t.is_meta for t in [*plain.parameters(), *plain.buffers()]), "backbone left tensors unloaded"
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(folder)
    spec = preprocessor_config(image_size, mean, std)
    (folder / PREPROCESSOR_FILE).write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")
    return folder
