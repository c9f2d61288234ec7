"""A consolidated model export: safetensors weights + JSON config and schema, loadable without pickles."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from models.config import ModelConfig
from models.head import MorphologyModel
from models.lora import is_lora, merge_lora
from sharding.config import from_dict, to_dict
from sharding.schema import Feature, FeatureSchema, Question

EXPORT_FORMAT = "galaxy-sommelier-morphology-model"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "export.json"


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
