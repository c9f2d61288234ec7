"""The DINOv2 backbone with a morphology head, LoRA adapters and count-aware losses."""

import importlib

# Lazy exports: `import models` (or models.config alone) must not pay the transformers import.
_EXPORTS = {
    "ModelConfig": "models.config", "BackboneConfig": "models.config", "HeadConfig": "models.config",
    "LoraSettings": "models.config", "load_model_config": "models.config",
    "MorphologyModel": "models.head", "OutputLayout": "models.head", "fractions": "models.head",
    "concentrations": "models.head", "public_logits": "models.head",
    "masked_mse_loss": "models.losses", "dirichlet_multinomial_loss": "models.losses", "batch_loss": "models.losses",
    "apply_lora": "models.lora", "save_lora": "models.lora", "load_lora": "models.lora", "merge_lora": "models.lora",
    "save_export": "models.io", "load_export": "models.io",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'models' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
