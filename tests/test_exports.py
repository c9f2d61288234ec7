"""Every export's backbone/ is a plain transformers DINOv2 with its image processor: it loads without this project,
gives the export's own features and inputs, and starts a head, full or LoRA stage."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from models.io import BACKBONE_DIR, PREPROCESSOR_FILE, WEIGHTS_FILE, load_export, read_export_meta, save_backbone
from sharding.schema import load_schema
from train.config import load_train_config
from train.stages import build, export, initial_export
from train_cases import TINY, _command, _overrides, _run

MEAN, STD = (0.1, 0.2, 0.3), (0.25, 0.2, 0.15)  # not ImageNet's: the processor must carry the run's own


def tiny_config(tmp_path, **overrides):
    base = {"data.loader.shard_root": str(tmp_path / "no-shards"), "data.loader.image_size": 56,
            "data.loader.mean": list(MEAN), "data.loader.std": list(STD)}
    base.update(overrides)
    return load_train_config(TINY, [f"{k}={v}".replace(" ", "") for k, v in base.items()])


def backbone_of(folder) -> dict[str, torch.Tensor]:
    """The backbone.* tensors of an export's model.safetensors, under Dinov2Model's own names."""
    weights = load_file(folder / WEIGHTS_FILE)
    return {k.removeprefix("backbone."): v for k, v in weights.items() if k.startswith("backbone.")}


@pytest.fixture(scope="module")
def untrained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("untrained")
    return initial_export(tiny_config(tmp, stage="full"), load_schema(), tmp / "export")


def test_backbone_loads_with_plain_transformers_and_gives_the_exports_features(untrained):
    from transformers import Dinov2Model

    from models.backbone import pool_tokens
    plain = Dinov2Model.from_pretrained(untrained / BACKBONE_DIR, local_files_only=True).eval()
    assert json.loads((untrained / BACKBONE_DIR / "config.json").read_text())["dtype"] == "float32"
    for name, tensor in backbone_of(untrained).items():
        assert plain.state_dict()[name].dtype == torch.float32 and torch.equal(plain.state_dict()[name], tensor), name
    model = load_export(untrained)
    images = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = pool_tokens(plain(pixel_values=images).last_hidden_state, model.config.pooling)
        torch.testing.assert_close(theirs, model.embed(images), rtol=0, atol=1e-6)
    assert read_export_meta(untrained)["metadata"]["step"] == 0  # the export eval loads is still there


def _encoded(side: int) -> bytes:
    """A smooth random RGB cutout, PNG-encoded (lossless: both paths decode the same pixels)."""
    coarse = (np.random.default_rng(side).random((side // 4 + 1, side // 4 + 1, 3)) * 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(coarse).resize((side, side), Image.BICUBIC).save(out, format="PNG")
    return out.getvalue()


def test_image_processor_reproduces_the_evaluation_input(untrained):
    """AutoImageProcessor on the export's preprocessor_config.json against eval's own decode -> resize -> normalise."""
    from transformers import AutoImageProcessor

    from loaders.evaluation import plain_image
    from loaders.source import LoaderConfig
    spec = json.loads((untrained / BACKBONE_DIR / PREPROCESSOR_FILE).read_text())
    assert (spec["size"], spec["image_mean"], spec["image_std"]) == ({"height": 56, "width": 56}, list(MEAN), list(STD))
    processor = AutoImageProcessor.from_pretrained(untrained / BACKBONE_DIR, local_files_only=True)
    cfg = LoaderConfig(image_size=56, mean=MEAN, std=STD)
    grey_level = 1 / (255 * torch.tensor(STD).view(3, 1, 1))  # one 8-bit step in normalised units, per channel

    def both(side: int) -> tuple[torch.Tensor, torch.Tensor]:
        with Image.open(io.BytesIO(_encoded(side))) as image:
            theirs = processor(images=image, return_tensors="pt")["pixel_values"][0]
        return theirs, plain_image(_encoded(side), cfg)

    # A cutout at the input size: no resampling on either side, the same tensor.
    theirs, ours = both(56)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    # Another size: PIL's (or torchvision's) bilinear filter on 8-bit pixels vs our antialiased float warp, close
    # but not equal (measured: 1.3 grey levels on average here; 0.8 on mock galaxies from 64 to 56 px).
    theirs, ours = both(90)
    assert theirs.shape == ours.shape == (3, 56, 56)
    assert ((theirs - ours).abs() / grey_level).mean() < 2.0


def test_every_stage_exports_its_merged_backbone(tmp_path):
    """head, full and LoRA exports of trained weights: backbone/ holds the model's backbone, LoRA merged in fp32."""
    from transformers import Dinov2Model

    from models.io import export_state_dict
    schema = load_schema()
    for stage in ("head", "full", "lora"):
        cfg = tiny_config(tmp_path, stage=stage)
        model, _ = build(cfg, schema)
        with torch.no_grad():  # "training": every weight moves, LoRA's zero-initialised B included
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        folder = export(cfg, schema, 7, model.state_dict(), tmp_path / stage)
        saved = Dinov2Model.from_pretrained(folder / BACKBONE_DIR, local_files_only=True).state_dict()
        expected = {k.removeprefix("backbone."): v for k, v in export_state_dict(model).items()
                    if k.startswith("backbone.")}
        assert saved.keys() == expected.keys() == backbone_of(folder).keys(), stage
        for name, tensor in saved.items():
            torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-6, msg=f"{stage} {name}")
            assert torch.equal(tensor, backbone_of(folder)[name]), (stage, name)
        if stage == "lora":  # the adapters reached the saved weights
            base = {k.replace(".base_layer", ""): v for k, v in model.backbone.get_base_model().state_dict().items()}
            assert any(not torch.equal(saved[k], base[k]) for k in saved)
        assert read_export_meta(folder)["metadata"]["stage"] == stage


def test_save_backbone_writes_fp32_of_a_bf16_backbone_and_refuses_adapters(tmp_path):
    from transformers import Dinov2Model

    from models.backbone import dinov2_config
    from models.config import LoraSettings, load_model_config
    from models.head import MorphologyModel
    from models.lora import apply_lora
    teacher = Dinov2Model(dinov2_config(load_model_config("tiny").backbone)).to(torch.bfloat16)
    save_backbone(teacher, tmp_path / "teacher", image_size=56, mean=MEAN, std=STD)
    loaded = Dinov2Model.from_pretrained(tmp_path / "teacher", local_files_only=True)
    saved = loaded.state_dict()
    for name, tensor in teacher.state_dict().items():
        assert saved[name].dtype == torch.float32 and torch.equal(saved[name], tensor.float()), name
    model = MorphologyModel(load_model_config("tiny"))
    apply_lora(model, LoraSettings())
    with pytest.raises(ValueError, match="merge_lora"):
        save_backbone(model.backbone, tmp_path / "lora", image_size=56, mean=MEAN, std=STD)


def test_head_full_and_lora_stages_build_from_an_exports_backbone(untrained, tmp_path):
    expected = backbone_of(untrained)
    for stage in ("head", "full", "lora"):
        cfg = tiny_config(tmp_path, stage=stage, model_overrides=f"[pretrained={untrained / BACKBONE_DIR}]")
        model, _ = build(cfg, load_schema())
        backbone = model.backbone.get_base_model() if stage == "lora" else model.backbone
        for name, tensor in backbone.state_dict().items():
            if "lora_" not in name:
                assert torch.equal(tensor, expected[name.replace(".base_layer", "")]), (stage, name)


def test_a_head_run_starts_from_an_exports_backbone(shard_root, untrained, tmp_path):
    """`model_overrides=[pretrained=<export>/backbone]` through `python -m train`: loaded, frozen, re-exported."""
    out = tmp_path / "run"
    printed = _run(_command(1, out, 2, _overrides(shard_root, stage="head")
                            + [f"model_overrides=[pretrained={untrained / BACKBONE_DIR}]"]))
    assert "randomly initialised backbone" not in printed.stdout + printed.stderr
    expected, trained = backbone_of(untrained), backbone_of(out / "export")
    assert expected.keys() == trained.keys() and all(torch.equal(trained[k], expected[k]) for k in expected)
    assert (out / "export" / BACKBONE_DIR / PREPROCESSOR_FILE).is_file()
    assert read_export_meta(out / "export")["pretrained_source"] == str(untrained / BACKBONE_DIR)
