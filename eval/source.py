"""A model to evaluate: a run folder or an export, loaded without pickles, with its provenance and input spec."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from models.head import MorphologyModel
from models.io import META_FILE, WEIGHTS_FILE, load_export, read_export_meta
from sharding.writer import sha256_of

EXPORT_DIR = "export"


@dataclass(frozen=True)
class InputSpec:
    """How images become model inputs: square size in pixels and per-channel normalisation on 0..1 pixels."""
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


@dataclass(frozen=True)
class ModelSource:
    path: Path  # the export folder
    meta: dict  # export.json

    @property
    def provenance(self) -> dict:
        return self.meta.get("metadata", {})

    @property
    def names(self) -> list[str]:
        return list(self.meta["output_names"])

    @property
    def schema(self) -> dict:
        return self.meta["schema"]

    @property
    def mix(self) -> dict[str, float]:
        """Training surveys and their shares, in the loaders' survey order."""
        return {survey: float(share) for survey, share in self.provenance.get("mix", [])}

    @property
    def training_surveys(self) -> list[str]:
        return list(self.mix)

    def input_spec(self) -> InputSpec:
        spec = self.provenance.get("input")
        if not spec:
            raise ValueError(f"{self.path / META_FILE} does not record the input image size and normalisation "
                             "(an export from before provenance was added); re-export it with the current "
                             "`python -m train`, which writes them")
        return InputSpec(int(spec["image_size"]), tuple(map(float, spec["mean"])), tuple(map(float, spec["std"])))

    def record(self) -> dict:
        """What every evaluation output states about the model it scored."""
        prov = self.provenance
        return {"export": str(self.path), "weights_sha256": sha256_of(self.path / WEIGHTS_FILE),
                "schema": {"name": self.schema["name"], "version": self.schema["version"]},
                "output_names": self.names, "other_questions": list(self.meta.get("other_questions", [])),
                "stage": prov.get("stage"), "step": prov.get("step"),
                "loss": prov.get("loss"), "mix": self.mix, "surveys": prov.get("surveys", {}),
                "input": prov.get("input"), "val_metrics": prov.get("val_metrics", {}),
                "git_commit": prov.get("git_commit"), "model": self.meta.get("model", {}).get("name")}


def resolve_export(path: str | Path) -> Path:
    """The export folder of a run folder (<run>/export) or the export folder itself."""
    path = Path(path)
    for candidate in (path, path / EXPORT_DIR):
        if (candidate / META_FILE).is_file():
            return candidate
    raise ValueError(f"{path} is neither a model export ({META_FILE} + {WEIGHTS_FILE}) nor a training run folder "
                     f"with {EXPORT_DIR}/ (a run writes it when it finishes; an unfinished run has none)")


def open_source(path: str | Path) -> ModelSource:
    folder = resolve_export(path)
    return ModelSource(folder, read_export_meta(folder))


def load_model(source: ModelSource, device: str | torch.device = "cpu") -> MorphologyModel:
    """The model in eval mode, in float32 (evaluation gives the same numbers on CPU and GPU)."""
    return load_export(source.path, device=device).float().eval()


def describe(source: ModelSource) -> str:
    """A few lines saying what the model is and what it saw, printed by every job."""
    rec = source.record()
    mix = ", ".join(f"{k} {v:.2f}" for k, v in rec["mix"].items()) or "unknown"
    spec = rec["input"] or {}
    lines = [f"model {source.path}: {rec['model']} {rec['stage'] or '?'} stage, step {rec['step']}, "
             f"{rec['loss'] or '?'} loss, {len(rec['output_names'])} outputs ({rec['schema']['name']} "
             f"v{rec['schema']['version']})",
             f"  trained on: {mix}; input {spec.get('image_size', '?')} px, mean {spec.get('mean')}, "
             f"std {spec.get('std')}; commit {(rec['git_commit'] or 'unknown')[:12]}"]
    for survey, val in rec["val_metrics"].items():
        lines.append(f"  final validation {survey}: r {val.get('r', float('nan')):.3f}, "
                     f"MAE {val.get('mae', float('nan')):.3f} on {val.get('n')} galaxies")
    return "\n".join(lines)


def check_shards(source: ModelSource, survey_dir: Path, spec: InputSpec) -> dict:
    """The survey's manifest, after checking the model can be fed from these shards; ValueError naming the fix."""
    manifest_path = survey_dir / "manifest.json"
    if not manifest_path.is_file():
        raise ValueError(f"{survey_dir}: no manifest.json; build the survey with `python -m sharding.build "
                         f"--survey {survey_dir.name} --out {survey_dir.parent}`")
    manifest = json.loads(manifest_path.read_text())
    shard_schema = manifest["feature_schema"]
    model_schema = source.schema
    if (shard_schema["name"], shard_schema["version"]) != (model_schema["name"], model_schema["version"]):
        raise ValueError(f"{survey_dir}: shards use feature schema {shard_schema['name']} v{shard_schema['version']}, "
                         f"the model {source.path} predicts {model_schema['name']} v{model_schema['version']}; "
                         "rebuild the shards with the model's schema")
    if manifest["members"][0] not in ("jpg", "png"):
        raise ValueError(f"{survey_dir}: image member {manifest['members'][0]!r} is not an 8-bit rendering")
    built = manifest["build"]["image_size"]
    trained = {s.get("image_size") for s in source.provenance.get("surveys", {}).values()} - {None}
    if built < spec.image_size and built not in trained:
        raise ValueError(f"{survey_dir}: shards were rendered at {built} px but the model takes {spec.image_size} px "
                         f"inputs from shards of {sorted(trained) or 'unknown'} px; upsampling would feed it blurrier "
                         f"galaxies than it was trained on. Rebuild with `python -m sharding.build --survey "
                         f"{survey_dir.name} --image-size {max(trained | {spec.image_size})}`")
    return manifest


def check_input_override(spec: InputSpec, image_size: int | None) -> InputSpec:
    """The model's own input spec; an --image-size that disagrees with it is an error, not a silent resize."""
    if image_size is not None and image_size != spec.image_size:
        raise ValueError(f"--image-size {image_size} disagrees with the model, which was trained on "
                         f"{spec.image_size} px inputs (its position embeddings would interpolate silently); "
                         "leave --image-size out")
    return spec
