"""Model tests: head grouping and "other" outputs, losses by hand, masks, LoRA, pretrained loading, export."""

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import dirichlet_multinomial

from models.backbone import count_backbone_params, dinov2_config
from models.config import DEFAULT_OTHER_QUESTIONS, MODEL_CONFIG_ROOT, LoraSettings, ModelConfig, load_model_config
from models.head import MorphologyModel, OutputLayout, concentrations, fractions, incomplete_questions
from models.losses import batch_loss, dirichlet_multinomial_loss, masked_mse_loss
from sharding.schema import Feature, FeatureSchema, Question, load_schema

SCHEMA = load_schema()
# peft asks transformers a deprecated question on every wrap; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


def tiny_config(*overrides: str) -> ModelConfig:
    return load_model_config("tiny", ["head.hidden_sizes=[32]", "head.dropout=0.0", *overrides])


def tiny_model(seed: int = 0, *overrides: str) -> MorphologyModel:
    torch.manual_seed(seed)
    return MorphologyModel(tiny_config(*overrides), SCHEMA).eval()


def images(num: int = 2, size: int = 56, seed: int = 1) -> torch.Tensor:
    return torch.randn(num, 3, size, size, generator=torch.Generator().manual_seed(seed))


# A two-question schema for losses by hand: "a" is complete, "b" keeps 2 answers and has an "other".
TOY = FeatureSchema("toy", 1, [Question("a", [Feature("a_x", "x"), Feature("a_y", "y")]),
                               Question("b", [Feature("b_p", "p"), Feature("b_q", "q")])])
TOY_LAYOUT = OutputLayout(TOY, ("b",))
# Raw logits: alpha = exp(logits) = a: [2, 0.5]; b: [1, 3], other 1.
TOY_ALPHA = [2.0, 0.5, 1.0, 3.0, 1.0]


def toy_logits(num: int = 1) -> torch.Tensor:
    return torch.tensor([math.log(a) for a in TOY_ALPHA]).repeat(num, 1).requires_grad_(True)


def dm_log_p(counts: list[float], alpha: list[float]) -> float:
    """Dirichlet-multinomial log-likelihood from scipy, independent of our lgamma formula."""
    return float(dirichlet_multinomial.logpmf(np.asarray(counts, float), np.asarray(alpha, float), int(sum(counts))))


# ---- configs ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(MODEL_CONFIG_ROOT.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_model_yaml_loads(path):
    cfg = load_model_config(path)
    assert cfg.name == path.stem
    assert cfg.backbone.hidden_size % cfg.backbone.num_attention_heads == 0
    assert OutputLayout(SCHEMA, tuple(cfg.head.other_questions)).num_outputs == 26 + len(cfg.head.other_questions)


def test_model_yamls_exist_and_reject_unknown_keys():
    assert {p.stem for p in MODEL_CONFIG_ROOT.glob("*.yaml")} >= {"tiny", "small", "base", "large"}
    with pytest.raises(ValueError, match="unknown key"):
        load_model_config("tiny", ["backbone.hidden=3"])
    with pytest.raises(ValueError, match="divisible"):
        load_model_config("tiny", ["backbone.num_attention_heads=3"])
    assert load_model_config("tiny", ["head.dropout=0.3"]).head.dropout == 0.3


@pytest.mark.parametrize("size, hidden, layers, heads, num_params", [
    ("small", 384, 12, 6, 22_056_576), ("base", 768, 12, 12, 86_580_480), ("large", 1024, 24, 16, 304_368_640)])
def test_public_dinov2_sizes(size, hidden, layers, heads, num_params):
    cfg = load_model_config(size).backbone
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (hidden, layers, heads)
    assert (cfg.mlp_ratio, cfg.patch_size, cfg.image_size, cfg.layerscale_value) == (4, 14, 518, 1.0)
    assert (cfg.layer_norm_eps, cfg.qkv_bias, cfg.use_swiglu_ffn, cfg.hidden_act) == (1e-6, True, False, "gelu")
    assert count_backbone_params(cfg) == num_params


@pytest.mark.parametrize("size", ["tiny", "small", "base"])
def test_param_formula_matches_real_module(size):
    from transformers import Dinov2Model

    cfg = load_model_config(size).backbone
    with torch.device("meta"):  # shapes without memory or init time
        model = Dinov2Model(dinov2_config(cfg))
    assert sum(p.numel() for p in model.parameters()) == count_backbone_params(cfg)
    assert model.encoder.layer[0].mlp.fc1.out_features == cfg.hidden_size * cfg.mlp_ratio
    assert model.embeddings.position_embeddings.shape[1] == (cfg.image_size // 14) ** 2 + 1


# ---- head ---------------------------------------------------------------------------------------------------


def test_head_outputs_grouped_by_question_with_other():
    model = tiny_model()
    x = images(3)
    public, raw = model(x), model(x, with_other=True)
    assert model.output_names == SCHEMA.names and public.shape == (3, 26)
    assert raw.shape == (3, 26 + len(DEFAULT_OTHER_QUESTIONS))
    frac = fractions(raw, model.layout)
    assert torch.allclose(fractions(public, model.layout), frac, atol=1e-6)
    for question, sl in SCHEMA.question_slices():
        sums = frac[:, sl].sum(dim=1)
        if question in DEFAULT_OTHER_QUESTIONS:
            assert (sums < 1 - 1e-3).all() and (sums > 0).all(), question
        else:
            assert torch.allclose(sums, torch.ones(3), atol=1e-5), question
    alpha = concentrations(raw, model.layout)
    for question, sl in SCHEMA.question_slices():  # Dirichlet mean = fractions, other included in the total
        column = model.layout.other_column(question)
        total = alpha[:, sl].sum(1) + (alpha[:, column] if column is not None else 0)
        assert torch.allclose(alpha[:, sl] / total[:, None], frac[:, sl], atol=1e-5)


def test_other_questions_configurable_and_validated():
    model = tiny_model(0, "head.other_questions=[]")
    raw = model(images(2), with_other=True)
    assert raw.shape == (2, 26)
    bulge = SCHEMA.question_slices()[SCHEMA.question_names.index("bulge-size")][1]
    assert torch.allclose(fractions(raw, model.layout)[:, bulge].sum(1), torch.ones(2), atol=1e-5)
    with pytest.raises(ValueError, match="not questions"):
        OutputLayout(SCHEMA, ("bulge-shape",))
    with pytest.raises(ValueError, match="columns"):
        fractions(torch.zeros(2, 25), OutputLayout(SCHEMA, ("bulge-size",)))


def test_forward_at_several_input_sizes_and_poolings():
    for pooling in ("cls_mean", "cls", "mean"):
        model = tiny_model(0, f"pooling={pooling}")
        for size in (56, 70):
            assert model(images(2, size)).shape == (2, 26)


def test_default_other_questions_match_mock_labels(tmp_path):
    """Label sums of every mock survey: only bulge-size falls short of 1, as head.other_questions says."""
    from sharding.catalog import map_labels, read_catalog
    from sharding.mock import main as mock_main
    from sharding.registry import load_survey

    for survey in ("sdss", "decals", "hst", "ukidss"):
        out = tmp_path / survey
        assert mock_main(["--survey", survey, "--num-galaxies", "24", "--out", str(out), "--seed", "2",
                          "--no-progress"]) == 0
        config = load_survey(survey)
        labels = map_labels(read_catalog(out / Path(config.catalog).name), config, SCHEMA)
        values = labels[SCHEMA.names].to_numpy(np.float64)
        mask = np.isfinite(values)
        assert incomplete_questions(np.nan_to_num(values), mask, SCHEMA) == DEFAULT_OTHER_QUESTIONS, survey


# ---- losses -------------------------------------------------------------------------------------------------


def toy_labels():
    """Two galaxies: 0 answers both questions; 1 comes from a survey without question b (garbage there)."""
    features = torch.tensor([[0.75, 0.25, 0.2, 0.4], [0.5, 0.5, float("nan"), 7.0]])
    mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    votes = torch.tensor([[3.0, 1.0, 1.0, 2.0], [2.0, 2.0, 99.0, 5.0]])
    total = torch.tensor([[4.0, 5.0], [4.0, 0.0]])
    return dict(features=features, feature_mask=mask, votes=votes, total_votes=total)


def test_masked_mse_by_hand():
    labels = toy_labels()
    logits = toy_logits(2)
    # fractions: a = [0.8, 0.2]; b = [0.2, 0.6] (other 0.2)
    errors = [0.05 ** 2, 0.05 ** 2, 0.0, 0.2 ** 2, 0.3 ** 2, 0.3 ** 2]
    loss = masked_mse_loss(logits, layout=TOY_LAYOUT, features=labels["features"],
                           feature_mask=labels["feature_mask"], total_votes=labels["total_votes"])
    assert loss.item() == pytest.approx(sum(errors) / 6, rel=1e-5)
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad[1, 2:] == 0).all() and (logits.grad[1, :2] != 0).all()


def test_dirichlet_multinomial_by_hand():
    labels = toy_labels()
    logits = toy_logits(2)
    nll = dirichlet_multinomial_loss(logits, layout=TOY_LAYOUT, reduction="none", votes=labels["votes"],
                                     feature_mask=labels["feature_mask"], total_votes=labels["total_votes"])
    expected = [[-dm_log_p([3, 1], [2, 0.5]), -dm_log_p([1, 2, 2], [1, 3, 1])],  # b: other gets 5 - 3 votes
                [-dm_log_p([2, 2], [2, 0.5]), 0.0]]
    assert nll.detach().numpy() == pytest.approx(np.array(expected), rel=1e-5, abs=1e-6)
    mean = dirichlet_multinomial_loss(logits, layout=TOY_LAYOUT, votes=labels["votes"],
                                      feature_mask=labels["feature_mask"], total_votes=labels["total_votes"])
    assert mean.item() == pytest.approx(sum(map(sum, expected)) / 2, rel=1e-5)  # per galaxy, summed over questions
    mean.backward()
    assert (logits.grad[1, 2:] == 0).all() and (logits.grad[1, :2] != 0).all() and (logits.grad[0] != 0).all()


def test_dirichlet_multinomial_matches_scipy_on_random_votes():
    """Random concentrations and vote counts on the toy layout against scipy, question by question."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        alpha = rng.uniform(0.05, 20.0, 5)
        a, b = rng.integers(0, 30, 2), rng.integers(0, 30, 3)  # b's third count goes to its "other" answer
        votes = torch.tensor([[*a, *b[:2]]], dtype=torch.float32)
        total = torch.tensor([[a.sum(), b.sum()]], dtype=torch.float32)
        nll = dirichlet_multinomial_loss(torch.tensor(np.log(alpha), dtype=torch.float64)[None], layout=TOY_LAYOUT,
                                         reduction="none", votes=votes, feature_mask=torch.ones(1, 4, dtype=torch.bool),
                                         total_votes=total)[0]
        expected = [-dm_log_p(a, alpha[:2]) if a.sum() else 0.0, -dm_log_p(b, alpha[2:]) if b.sum() else 0.0]
        assert nll.numpy() == pytest.approx(expected, rel=1e-4, abs=1e-4)


def test_absent_answer_merges_into_rest_bucket():
    """A survey lacking b_q: its votes are ignored, b_q's alpha joins other's ("rest": 5 - 1 = 4 votes)."""
    labels = toy_labels()
    mask = labels["feature_mask"].clone()
    mask[0, 3] = False
    votes = labels["votes"].clone()
    nll = dirichlet_multinomial_loss(toy_logits(2), layout=TOY_LAYOUT, reduction="none", votes=votes,
                                     feature_mask=mask, total_votes=labels["total_votes"])
    assert nll[0, 1].item() == pytest.approx(-dm_log_p([1, 4], [1, 3 + 1]), rel=1e-5)
    votes[0, 3] = 1000.0  # an absent answer's votes change nothing
    again = dirichlet_multinomial_loss(toy_logits(2), layout=TOY_LAYOUT, reduction="none", votes=votes,
                                       feature_mask=mask, total_votes=labels["total_votes"])
    assert torch.equal(nll, again)


def test_absent_feature_changes_nothing_for_mse():
    labels = toy_labels()
    base = masked_mse_loss(toy_logits(2), layout=TOY_LAYOUT, **{k: labels[k] for k in
                                                                   ("features", "feature_mask", "total_votes")})
    features = labels["features"].clone()
    features[1, 2:] = torch.tensor([-5.0, float("inf")])
    changed = masked_mse_loss(toy_logits(2), layout=TOY_LAYOUT, features=features,
                              feature_mask=labels["feature_mask"], total_votes=labels["total_votes"])
    assert torch.equal(base, changed)
    # A question with zero votes is ignored even where the mask says present.
    total = labels["total_votes"].clone()
    total[0, 1] = 0.0
    dropped = masked_mse_loss(toy_logits(2), layout=TOY_LAYOUT, features=features,
                              feature_mask=labels["feature_mask"], total_votes=total, reduction="none")
    assert (dropped[0, 2:] == 0).all() and (dropped[0, :2] > 0).all()


@pytest.mark.parametrize("kind", ["mse", "dirichlet"])
def test_gradients_flow_only_where_labels_exist(kind):
    """A real Batch of three surveys' galaxies; the model's gradient reaches only labelled questions."""
    from loaders.batch import Batch

    model = tiny_model()
    num = 3
    total = torch.full((num, len(SCHEMA.questions)), 10.0)
    mask = torch.ones(num, 26, dtype=torch.bool)
    bar = SCHEMA.question_slices()[SCHEMA.question_names.index("bar")][1]
    mask[1, bar], total[1, SCHEMA.question_names.index("bar")] = False, 0.0  # survey 1 has no bar question
    mask[2], total[2] = False, 0.0  # survey 2: no labels at all
    votes = torch.where(mask, torch.full((num, 26), 2.0), torch.full((num, 26), 50.0))  # garbage where absent
    features = torch.where(mask, torch.full((num, 26), 0.3), torch.full((num, 26), 0.9))
    batch = Batch(images(num), features, mask, votes, total, torch.tensor([0, 1, 2]), ["a", "b", "c"])
    raw = model(batch.images, with_other=True)
    raw.retain_grad()
    loss = batch_loss(kind, raw, batch, model.layout)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    assert (raw.grad[2] == 0).all() and (raw.grad[1, bar] == 0).all()
    assert (raw.grad[0] != 0).all() and (raw.grad[1, :bar.start] != 0).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.head.parameters())


def test_dirichlet_needs_raw_logits():
    labels = toy_labels()
    with pytest.raises(ValueError, match="with_other=True"):
        dirichlet_multinomial_loss(toy_logits(2)[:, :4], layout=TOY_LAYOUT, votes=labels["votes"],
                                   feature_mask=labels["feature_mask"], total_votes=labels["total_votes"])


# ---- LoRA ---------------------------------------------------------------------------------------------------


def perturb_adapters(model: MorphologyModel, seed: int = 3) -> None:
    """LoRA B starts at zero (adapters are a no-op): give it values so merging has something to merge."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.backbone.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)


def test_lora_targets_resolve_from_module_names():
    from torch import nn

    from models.lora import resolve_lora_targets

    new = tiny_model().backbone
    # transformers >= 5.18 names the projections q_proj/v_proj, earlier releases query/value: both resolve.
    renamed = any(name.endswith("q_proj") for name, _ in new.named_modules())
    assert resolve_lora_targets(new, ["query", "value"]) == (["q_proj", "v_proj"] if renamed else ["query", "value"])
    assert resolve_lora_targets(new, ["mlp"]) == ["fc1", "fc2"]
    old = nn.ModuleDict({"attention": nn.ModuleDict({"query": nn.Linear(4, 4), "key": nn.Linear(4, 4),
                                                     "value": nn.Linear(4, 4)})})
    assert resolve_lora_targets(old, ["query", "value"]) == ["query", "value"]
    with pytest.raises(ValueError, match="no module for LoRA role 'query'"):
        resolve_lora_targets(nn.Sequential(nn.Linear(4, 4)), ["query"])


def test_lora_trains_only_adapters_and_head():
    from models.lora import apply_lora

    model = tiny_model()
    num_total = sum(p.numel() for p in model.parameters())
    num_head = sum(p.numel() for p in model.head.parameters())
    report = apply_lora(model, LoraSettings(rank=4, alpha=8, dropout=0.0))
    hidden, layers = 64, 2
    num_adapter = layers * 2 * (4 * hidden + hidden * 4)  # q and v: A (r x h) + B (h x r)
    renamed = any(name.endswith("q_proj") for name, _ in model.backbone.named_modules())  # transformers >= 5.18
    assert report.target_modules == (("q_proj", "v_proj") if renamed else ("query", "value"))
    assert (report.num_adapter, report.num_head) == (num_adapter, num_head)
    assert report.num_trainable == num_adapter + num_head
    assert report.num_total == num_total + num_adapter
    assert report.percent_trainable < 10
    for name, param in model.named_parameters():
        assert param.requires_grad == ("lora_" in name or name.startswith("head.")), name
    loss = model(images(2), with_other=True).square().mean()
    loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


def test_lora_percentage_on_base_meta():
    """ViT-B/14 + rank 16 q/v adapters + the [512, 256] head: the original plan's ~1-5% trainable."""
    from models.lora import apply_lora

    with torch.device("meta"):
        model = MorphologyModel(load_model_config("base"), SCHEMA)
    report = apply_lora(model, LoraSettings())
    assert report.num_adapter == 12 * 2 * (16 * 768 * 2)
    assert 1.0 < report.percent_trainable < 5.0


def test_lora_save_reload_and_merge_round_trip(tmp_path):
    from transformers import Dinov2Model

    from models.lora import apply_lora, is_lora, load_lora, merge_lora, save_lora

    x = images(2)
    model = tiny_model(seed=5)
    plain = model(x)
    apply_lora(model, LoraSettings(rank=4, alpha=8, dropout=0.0))
    perturb_adapters(model)
    with torch.no_grad():
        model.head[-1].bias.add_(1.0)  # a trained head, too (after the LayerNorm, so it shows)
        adapted = model(x)
    assert not torch.allclose(adapted, plain, atol=1e-3)
    save_lora(model, tmp_path / "lora")
    assert {"adapter_config.json", "adapter_model.safetensors", "head.safetensors"} <= \
        {p.name for p in (tmp_path / "lora").iterdir()}

    reloaded = tiny_model(seed=5)  # same base weights, fresh head
    load_lora(reloaded, tmp_path / "lora")
    with torch.no_grad():
        assert torch.allclose(reloaded(x), adapted, atol=1e-6)
        merge_lora(model)
        assert not is_lora(model) and isinstance(model.backbone, Dinov2Model)
        assert not any("lora_" in n for n, _ in model.named_parameters())
        assert torch.allclose(model(x), adapted, atol=1e-5)
    with pytest.raises(ValueError, match="not a LoRA folder"):
        load_lora(tiny_model(), tmp_path)


# ---- pretrained weights and export --------------------------------------------------------------------------


def test_pretrained_backbone_loads_from_local_folder(tmp_path):
    from transformers import Dinov2Model

    cfg = tiny_config()
    torch.manual_seed(11)
    source = Dinov2Model(dinov2_config(cfg.backbone))
    source.save_pretrained(tmp_path / "dinov2")
    torch.manual_seed(0)  # a different seed: equal weights can only come from the folder
    model = MorphologyModel(tiny_config(f"pretrained={tmp_path / 'dinov2'}"), SCHEMA)
    loaded, expected = model.backbone.state_dict(), source.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    assert not torch.equal(MorphologyModel(cfg, SCHEMA).backbone.embeddings.cls_token, expected["embeddings.cls_token"])

    from models.io import load_export, save_export

    save_export(model, tmp_path / "export")
    shutil.rmtree(tmp_path / "dinov2")  # an export stands alone: eval never needs the pretrained folder
    reloaded = load_export(tmp_path / "export")
    assert all(torch.equal(reloaded.backbone.state_dict()[k], expected[k]) for k in expected)


def test_pretrained_folder_errors(tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import Dinov2Model

    with pytest.raises(ValueError, match="does not exist"):
        MorphologyModel(tiny_config(f"pretrained={tmp_path / 'missing'}"), SCHEMA)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not in save_pretrained layout"):
        MorphologyModel(tiny_config(f"pretrained={tmp_path / 'empty'}"), SCHEMA)
    Dinov2Model(dinov2_config(tiny_config("backbone.hidden_size=32").backbone)).save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="hidden_size: folder 32 vs config 64"):
        MorphologyModel(tiny_config(f"pretrained={tmp_path / 'other'}"), SCHEMA)
    Dinov2Model(dinov2_config(tiny_config().backbone)).save_pretrained(tmp_path / "partial")
    weights = load_file(tmp_path / "partial" / "model.safetensors")
    del weights["embeddings.cls_token"]  # from_pretrained would fill it randomly and only log a warning
    save_file(weights, tmp_path / "partial" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks backbone weights.*cls_token"):
        MorphologyModel(tiny_config(f"pretrained={tmp_path / 'partial'}"), SCHEMA)


def test_export_round_trip(tmp_path):
    from safetensors import safe_open

    from models.io import load_export, save_export
    from models.lora import apply_lora, is_lora

    model = tiny_model(seed=7)
    apply_lora(model, LoraSettings(rank=4, alpha=8, dropout=0.0))
    perturb_adapters(model)
    x = images(2)
    with torch.no_grad():
        expected = model(x, with_other=True)
    save_export(model, tmp_path / "export", metadata={"stage": "lora"})
    assert is_lora(model)  # exporting merged a copy, not the model
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["export.json", "model.safetensors"]
    with safe_open(tmp_path / "export" / "model.safetensors", "pt") as f:
        assert not any("lora_" in k for k in f.keys())
    loaded = load_export(tmp_path / "export")
    assert loaded.output_names == SCHEMA.names and loaded.layout.other_questions == ("bulge-size",)
    with torch.no_grad():
        assert torch.allclose(loaded(x, with_other=True), expected, atol=1e-5)
    with pytest.raises(ValueError, match="not a model export"):
        load_export(tmp_path)
