"""LoRA adapters on the DINOv2 backbone through peft: target names resolved at run time, save, reload, merge."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from models.config import LoraSettings

HEAD_FILE = "head.safetensors"
# Role -> alternative module-name sets, newest transformers first: DINOv2's attention projections are
# q_proj/k_proj/v_proj/o_proj since transformers 5.18 and query/key/value/output.dense before.
ROLE_MODULES: dict[str, tuple[tuple[str, ...], ...]] = {
    "query": (("q_proj",), ("query",)),
    "key": (("k_proj",), ("key",)),
    "value": (("v_proj",), ("value",)),
    "output": (("o_proj",), ("dense",)),
    "mlp": (("fc1", "fc2"), ("weights_in", "weights_out")),
}


@dataclass(frozen=True)
class LoraReport:
    target_modules: tuple[str, ...]
    num_adapter: int  # LoRA A/B parameters
    num_head: int
    num_trainable: int
    num_total: int

    @property
    def percent_trainable(self) -> float:
        return 100.0 * self.num_trainable / self.num_total

    def __str__(self) -> str:
        return (f"LoRA on {list(self.target_modules)}: {self.num_trainable:,} trainable of {self.num_total:,} "
                f"({self.percent_trainable:.2f}%): adapters {self.num_adapter:,}, head {self.num_head:,}")


def linear_module_names(module: nn.Module) -> set[str]:
    """Last name part of every nn.Linear inside `module` (what peft's target_modules match)."""
    return {name.rsplit(".", 1)[-1] for name, sub in module.named_modules() if isinstance(sub, nn.Linear)}


def resolve_lora_targets(backbone: nn.Module, roles: list[str]) -> list[str]:
    """Module names for LoRA roles (query, key, value, output, mlp) as the loaded backbone spells them."""
    found = linear_module_names(backbone)
    targets: list[str] = []
    for role in roles:
        if role not in ROLE_MODULES:
            raise ValueError(f"unknown LoRA target role {role!r}; expected one of {sorted(ROLE_MODULES)}")
        names = next((alt for alt in ROLE_MODULES[role] if set(alt) <= found), None)
        if names is None:
            raise ValueError(f"no module for LoRA role {role!r} in the backbone: looked for "
                             f"{[list(a) for a in ROLE_MODULES[role]]}, its Linear layers are {sorted(found)}")
        targets += [n for n in names if n not in targets]
    return targets


def is_lora(model: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model.backbone, PeftModel)


def lora_report(model: nn.Module) -> LoraReport:
    """Trainable parameter counts of a model whose backbone carries adapters."""
    adapter = sum(p.numel() for n, p in model.backbone.named_parameters() if "lora_" in n and p.requires_grad)
    head = sum(p.numel() for p in model.head.parameters() if p.requires_grad)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    targets = model.backbone.peft_config["default"].target_modules if is_lora(model) else ()
    return LoraReport(tuple(sorted(targets or ())), adapter, head, trainable, total)


def apply_lora(model: nn.Module, settings: LoraSettings) -> LoraReport:
    """Wrap `model.backbone` in LoRA adapters: the backbone freezes, only adapters and the head train."""
    from peft import LoraConfig, get_peft_model

    if is_lora(model):
        raise ValueError("the model's backbone already carries LoRA adapters")
    targets = resolve_lora_targets(model.backbone, settings.targets)
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=targets, bias="none")
    model.backbone = get_peft_model(model.backbone, config)
    model.head.requires_grad_(True)
    return lora_report(model)


def save_lora(model: nn.Module, folder: str | Path) -> Path:
    """Adapters (peft save_pretrained: adapter_config.json + adapter_model.safetensors) and the head weights."""
    if not is_lora(model):
        raise ValueError("the model has no LoRA adapters to save")
    folder = Path(folder)
    model.backbone.save_pretrained(folder)
    save_file({k: v.detach().contiguous().cpu() for k, v in model.head.state_dict().items()}, folder / HEAD_FILE)
    return folder


def load_lora(model: nn.Module, folder: str | Path, trainable: bool = False) -> LoraReport:
    """Attach adapters and head weights saved by `save_lora` to a model built from the same config."""
    from peft import PeftModel

    folder = Path(folder)
    if not (folder / "adapter_config.json").is_file() or not (folder / HEAD_FILE).is_file():
        raise ValueError(f"{folder} is not a LoRA folder written by save_lora (adapter_config.json + {HEAD_FILE})")
    if is_lora(model):
        raise ValueError("the model's backbone already carries LoRA adapters")
    model.backbone = PeftModel.from_pretrained(model.backbone, folder, is_trainable=trainable)
    model.head.load_state_dict(load_file(folder / HEAD_FILE))
    model.head.requires_grad_(trainable)
    return lora_report(model)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold the adapters into the backbone weights (peft merge_and_unload): a plain Dinov2Model again."""
    if not is_lora(model):
        raise ValueError("the model has no LoRA adapters to merge")
    model.backbone = model.backbone.merge_and_unload()
    return model
