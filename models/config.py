"""Typed configs of the backbone, morphology head and LoRA adapters, loadable from configs/models/*.yaml."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from sharding.config import CONFIG_ROOT, config_file, load_config

MODEL_CONFIG_ROOT = CONFIG_ROOT / "models"

# The standard schema keeps 2 of the 4 (GZ2, GZ Hubble, UKIDSS) or 5 (DECaLS) bulge-size answers; every other
# question keeps all of its answers (sharding/gz_schemas/gz_ortho_schemas_long.csv), so only bulge-size
# fractions fall short of 1 and need an implicit "other" answer.
DEFAULT_OTHER_QUESTIONS = ["bulge-size"]


@dataclass
class BackboneConfig:
    """Dinov2Config fields, named as in the public facebook/dinov2-* config.json files."""
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    mlp_ratio: int = 4
    patch_size: int = 14
    image_size: int = 518
    num_channels: int = 3
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    layerscale_value: float = 1.0
    qkv_bias: bool = True
    use_swiglu_ffn: bool = False
    initializer_range: float = 0.02
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    drop_path_rate: float = 0.0

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                             f"{self.num_attention_heads}")
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "mlp_ratio", "patch_size",
                     "image_size", "num_channels"):
            if getattr(self, name) <= 0:
                raise ValueError(f"backbone.{name} must be positive, got {getattr(self, name)}")

    @property
    def intermediate_size(self) -> int:
        return self.hidden_size * self.mlp_ratio


@dataclass
class HeadConfig:
    hidden_sizes: list[int] = field(default_factory=lambda: [512, 256])
    dropout: float = 0.2
    # Questions whose named answers do not cover all of the native answers: each gets one internal
    # "other" logit, so that softmax(named + other) matches labels whose fractions sum to less than 1.
    other_questions: list[str] = field(default_factory=lambda: list(DEFAULT_OTHER_QUESTIONS))

    def __post_init__(self):
        if any(h <= 0 for h in self.hidden_sizes):
            raise ValueError(f"head.hidden_sizes must be positive, got {self.hidden_sizes}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"head.dropout must be in [0, 1), got {self.dropout}")
        if len(set(self.other_questions)) != len(self.other_questions):
            raise ValueError(f"head.other_questions has duplicates: {self.other_questions}")


@dataclass
class ModelConfig:
    name: str = "base"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    # A local folder in save_pretrained layout (config.json + model.safetensors); None: random init.
    pretrained: str | None = None
    # DINOv2's linear-probe recipe concatenates the class token and the mean patch token.
    pooling: Literal["cls_mean", "cls", "mean"] = "cls_mean"
    head: HeadConfig = field(default_factory=HeadConfig)


@dataclass
class LoraSettings:
    """LoRA adapter options; `targets` are roles, resolved to module names of the loaded backbone."""
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.1
    targets: list[Literal["query", "key", "value", "output", "mlp"]] = field(
        default_factory=lambda: ["query", "value"])

    def __post_init__(self):
        if self.rank <= 0:
            raise ValueError(f"lora.rank must be positive, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ValueError("lora.targets is empty")


def model_config_path(name_or_path: str | Path) -> Path:
    """configs/models/<name>.yaml for a bare size name (tiny, small, base, large), else the path itself."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.parent != Path("."):
        return path
    return config_file("models", str(name_or_path))


def load_model_config(name_or_path: str | Path, overrides: list[str] | None = None) -> ModelConfig:
    """A ModelConfig from a size name or YAML path, with dotted overrides such as `head.dropout=0.1`."""
    return load_config(ModelConfig, model_config_path(name_or_path), overrides)
