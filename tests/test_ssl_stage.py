"""Stage ssl's wiring without processes: configs it refuses, parameter groups, continued pretraining (LoRA + the
last blocks, EMA over the trainable parameters only), the teacher's checkpoint file and export."""

import pytest
import torch

from sharding.config import CONFIG_ROOT
from train.config import load_train_config
from train_cases import _pretrained_tiny

SSL_CPU = CONFIG_ROOT / "train" / "ssl_cpu.yaml"


def test_ssl_configs_load_and_refuse_what_breaks_the_objective():
    cfg = load_train_config(SSL_CPU)
    assert cfg.stage == "ssl" and cfg.data.loader.views.enabled and cfg.zero_stage == 2
    ssl = load_train_config(CONFIG_ROOT / "train" / "ssl.yaml")
    assert ssl.precision == "bf16" and ssl.data.loader.views.global_crops.size == 224
    with pytest.raises(ValueError, match="zero_stage=2"):
        load_train_config(SSL_CPU, ["zero_stage=3"])
    with pytest.raises(ValueError, match="views.enabled=true"):
        load_train_config(SSL_CPU, ["data.loader.views.enabled=false"])
    from train.ssl_stage import SSLObjective
    from train.stages import build
    from train.world import World
    small = load_train_config(SSL_CPU, ["ssl.dino_head.num_prototypes=16", "ssl.dino_head.hidden_size=16",
                                        "ssl.koleo_group_size=24"])
    student, layers = build(small, None)
    with pytest.raises(ValueError, match="koleo_group_size=24 must divide every rank's micro-batch"):
        SSLObjective(small, World(world_size=2), student, layers)


def test_param_groups_decay_by_layer_and_keep_the_prototype_layers_apart():
    from train.ssl_stage import ssl_param_groups
    from train.stages import build
    cfg = load_train_config(SSL_CPU, ["ssl.dino_head.num_prototypes=16", "ssl.dino_head.hidden_size=16",
                                      "optim.layer_decay=0.5", "optim.lr=1.0"])
    student, layers = build(cfg, None)
    groups, decays, last = ssl_param_groups(student, cfg, layers)
    by_name = {g["name"]: g for g in groups}
    assert by_name["last_layer"]["lr_scale"] == 1.0 and last[groups.index(by_name["last_layer"])]
    assert {id(p) for p in by_name["last_layer"]["params"]} == {id(p) for n, p in student.named_parameters()
                                                                  if "last_layer." in n}
    assert by_name["depth0_patch"]["lr_scale"] == pytest.approx(0.5 ** (layers + 1) * 0.2)
    assert by_name[f"depth{layers}"]["lr_scale"] == pytest.approx(0.5)
    assert all(g["weight_decay"] == 0.0 for g, d in zip(groups, decays) if not d)
    assert sum(len(g["params"]) for g in groups) == len(list(student.parameters()))


def test_continued_pretraining_trains_adapters_and_the_last_blocks_and_averages_only_those(tmp_path):
    from models.config import load_model_config
    from models.ssl_arch import SSLTeacher
    from models.ssl_continued import ContinuedPretraining, build_student
    from models.ssl_heads import DINOHeadConfig
    from models.config import LoraSettings
    from train.ssl_state import plain_backbone
    pretrained = _pretrained_tiny(tmp_path / "pretrained")
    config = load_model_config("tiny", [f"pretrained={tmp_path / 'pretrained'}"])
    head = DINOHeadConfig(num_prototypes=16, hidden_size=16, bottleneck_size=8)
    settings = ContinuedPretraining(enabled=True, lora=LoraSettings(rank=4, dropout=0.1), unfrozen_blocks=1)
    student = build_student(config, head, None, settings)
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert any("layer.0." in n and "lora_A" in n and "q_proj" in n for n in trainable)
    assert not any("layer.1." in n and "lora_" in n for n in trainable)  # the unfrozen block carries no adapter
    assert any(n.endswith("layer.1.mlp.fc1.weight") for n in trainable)
    assert not any(n.endswith("layer.0.mlp.fc1.weight") or "embeddings" in n for n in trainable)
    assert any("layer.0.norm1" in n for n in trainable) and any(n.startswith("dino_head.") for n in trainable)
    teacher = SSLTeacher(student, 0.9)
    assert set(teacher.ema_names) == trainable
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    teacher.update(student, momentum=0.0)
    frozen = dict(teacher.network.named_parameters())
    fc1 = next(n for n in frozen if n.endswith("layer.0.mlp.fc1.weight"))
    assert torch.equal(frozen[fc1], pretrained["encoder.layer.0.mlp.fc1.weight"])  # frozen: never averaged
    assert set(teacher.saved_state()) == {f"network.{n}" for n in trainable} | {"dino_centre.centre",
                                                                                 "ibot_centre.centre"}
    plain = plain_backbone(teacher)
    assert type(plain).__name__ == "Dinov2Model" and hasattr(teacher.network.backbone, "merge_and_unload")
    with pytest.raises(ValueError, match="model.pretrained"):
        build_student(load_model_config("tiny"), head, None, settings)
    with pytest.raises(ValueError, match="full training"):
        build_student(config, head, None, ContinuedPretraining(enabled=True, unfrozen_blocks=2))


def test_teacher_checkpoint_file_round_trips_beside_the_engine_state(tmp_path):
    from models.config import load_model_config
    from models.ssl_arch import SSLTeacher
    from models.ssl_continued import build_student
    from models.ssl_heads import DINOHeadConfig
    from train.ssl_state import TEACHER_FILE, TeacherCheckpoint
    from train.world import World

    class Engine:
        def save(self, directory, tag, client_state):
            (directory / tag).mkdir(parents=True)

        def load(self, directory, tag):
            return {"step": 3}

    student = build_student(load_model_config("cpu", ["backbone.num_hidden_layers=1"]),
                            DINOHeadConfig(num_prototypes=8, hidden_size=8, bottleneck_size=4), None)
    saved = SSLTeacher(student, 0.9)
    saved.dino_centre.centre.fill_(0.25)
    TeacherCheckpoint(Engine(), saved, World()).save(tmp_path, "step00000003", {})
    assert (tmp_path / "step00000003" / TEACHER_FILE).is_file()
    with torch.no_grad():
        for p in student.parameters():
            p.mul_(2.0)
    restored = SSLTeacher(student, 0.9)
    client = TeacherCheckpoint(Engine(), restored, World()).load(tmp_path, "step00000003_universal")
    assert client == {"step": 3}
    assert all(torch.equal(a, b) for a, b in zip(saved.state_dict().values(), restored.state_dict().values()))
    with pytest.raises(ValueError, match="no ssl_teacher.safetensors"):
        TeacherCheckpoint(Engine(), restored, World()).load(tmp_path, "step00000009")
