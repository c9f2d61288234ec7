"""The student of self-supervised training, plain or for continued pretraining of a pretrained DINOv2.

Continued pretraining (ExPLoRA-style, Khanna et al. 2024): start from a local pretrained folder, freeze it, put LoRA
adapters on the attention projections of the frozen blocks, unfreeze the last N blocks whole, and train those with
the heads under the same DINO/iBOT objective. The teacher then averages only these trainable parameters. It is the
cheap way to adapt DINOv2-L/g to a survey: a few percent of the weights get gradients and optimizer states.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from models.config import LoraSettings, ModelConfig
from models.lora import resolve_lora_targets
from models.sample_noise import per_sample_noise
from models.ssl_arch import SSLNetwork
from models.ssl_heads import DINOHeadConfig


@dataclass(frozen=True)
class ContinuedPretraining:
    enabled: bool = False
    # LoRA on the attention of the frozen blocks: query and value by default, as ExPLoRA (which uses rank 64).
    # LoraSettings' own defaults, so that a partial override (ssl.continued.lora.rank=64) keeps the others.
    lora: LoraSettings = field(default_factory=LoraSettings)
    unfrozen_blocks: int = 1  # the last N transformer blocks train whole
    train_norms: bool = True  # every LayerNorm of the backbone trains too (a few thousand parameters)

    def __post_init__(self):
        if self.unfrozen_blocks < 0:
            raise ValueError(f"ssl.continued.unfrozen_blocks must be >= 0, got {self.unfrozen_blocks}")


def _continue_from_pretrained(network: SSLNetwork, settings: ContinuedPretraining) -> None:
    from peft import LoraConfig, get_peft_model

    num_layers = network.config.backbone.num_hidden_layers
    if not network.config.pretrained:
        raise ValueError("ssl.continued.enabled needs pretrained weights to continue from: set model.pretrained "
                         "(model_overrides=[pretrained=/path/to/save_pretrained/folder])")
    if settings.unfrozen_blocks >= num_layers:
        raise ValueError(f"ssl.continued.unfrozen_blocks={settings.unfrozen_blocks} unfreezes all {num_layers} "
                         f"blocks: that is full training, set ssl.continued.enabled=false instead")
    frozen = list(range(num_layers - settings.unfrozen_blocks))
    lora = settings.lora
    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias="none",
                        target_modules=resolve_lora_targets(network.backbone, lora.targets),
                        layers_to_transform=frozen, layers_pattern="layer")
    network.backbone = get_peft_model(network.backbone, config)  # freezes every backbone weight but the adapters
    base = network.backbone.get_base_model()
    for index in range(len(frozen), num_layers):
        base.encoder.layer[index].requires_grad_(True)
    if settings.train_norms:
        for module in base.modules():
            if isinstance(module, nn.LayerNorm):
                module.requires_grad_(True)


def build_student(config: ModelConfig, dino_head: DINOHeadConfig, ibot_head: DINOHeadConfig | None,
                  continued: ContinuedPretraining | None = None) -> SSLNetwork:
    """The student (the caller seeds): random or pretrained backbone, heads, continued-pretraining adapters, and
    dropout / drop path keyed per sample (models.sample_noise), so the objective is the same on any world size."""
    network = SSLNetwork(config, dino_head, ibot_head)
    if continued is not None and continued.enabled:
        _continue_from_pretrained(network, continued)
    return per_sample_noise(network)


def trainable_summary(network: nn.Module) -> str:
    trainable = sum(p.numel() for p in network.parameters() if p.requires_grad)
    total = sum(p.numel() for p in network.parameters())
    return f"{trainable:,} of {total:,} parameters train ({100.0 * trainable / max(total, 1):.2f}%)"
