"""bench/ssl_bench.py --backbone: one backbone for every run of an --out, and an --out never mixes two."""

import pytest

from bench import ssl_bench


def test_backbone_settings_join_every_runs_model_overrides():
    wide = ssl_bench.parse_args(["--backbone", "hidden_size=96", "--backbone", "num_attention_heads=3"]).backbone
    assert wide == ["backbone.hidden_size=96", "backbone.num_attention_heads=3"]
    assert ssl_bench.with_backbone(["max_steps=5"], wide) == [
        "max_steps=5", "model_overrides=[backbone.hidden_size=96,backbone.num_attention_heads=3]"]
    assert ssl_bench.with_backbone(["model_overrides=[pretrained=/x/backbone]", "seed=1"], wide) == [
        "seed=1", "model_overrides=[pretrained=/x/backbone,backbone.hidden_size=96,backbone.num_attention_heads=3]"]
    assert ssl_bench.with_backbone(["model_overrides=[pretrained=/x]"], []) == ["model_overrides=[pretrained=/x]"]
    # What train() passes on is what the train CLI reads: a model of the asked width.
    from models.config import load_model_config
    from train.config import load_train_config
    cfg = load_train_config(ssl_bench.SSL, ssl_bench.with_backbone(["model_overrides=[head.dropout=0.1]"], wide))
    model = load_model_config(cfg.model, cfg.model_overrides)
    assert (model.backbone.hidden_size, model.backbone.num_attention_heads, model.head.dropout) == (96, 3, 0.1)
    # The MLP head stage's overrides (a list inside the list, so quoted) read the same, with or without --backbone.
    mlp = [*ssl_bench.MLP_HEAD, 'model_overrides=["pretrained=/x/backbone", "head.hidden_sizes=[512,256]"]']
    for backbone, width in ((wide, 96), ([], 64)):
        cfg = load_train_config(ssl_bench.CPU, ssl_bench.with_backbone(mlp, backbone))
        model = load_model_config(cfg.model, cfg.model_overrides)
        assert (cfg.stage, model.pretrained, model.head.hidden_sizes, model.backbone.hidden_size) == (
            "head", "/x/backbone", [512, 256], width)


def test_a_bad_setting_and_a_second_backbone_in_one_out_stop_with_the_fix(tmp_path, capsys):
    with pytest.raises(SystemExit):
        ssl_bench.parse_args(["--backbone", "hidden_size"])
    assert "KEY=VALUE" in capsys.readouterr().err
    args = ssl_bench.parse_args(["--out", str(tmp_path / "o"), "--backbone", "hidden_size=96"])
    ssl_bench.check_backbone(args)
    ssl_bench.check_backbone(args)  # the same settings again: fine
    with pytest.raises(ValueError, match="use another --out"):
        ssl_bench.check_backbone(ssl_bench.parse_args(["--out", str(tmp_path / "o")]))


def test_targets_with_a_variant_make_the_runs_its_judge_reads(tmp_path, monkeypatch):
    """--targets --variant NAME ...: the variant's SSL (the recipe's data plus its overrides) and head-first 10% run
    beside the recipe's, under the names bench/ssl_skies.py --recipe NAME reads (target_runs)."""
    from bench import ssl_targets
    made = {}

    def fake_train(name, config, overrides, args):
        made[name] = overrides
        (args.out / "runs" / name / "export" / "backbone").mkdir(parents=True, exist_ok=True)
        return args.out / "runs" / name
    read = []
    monkeypatch.setattr(ssl_bench, "train", fake_train)
    monkeypatch.setattr(ssl_bench, "target_arms", lambda out, survey, runs: read.append(runs) or {})
    monkeypatch.setattr(ssl_bench, "score", lambda arms, shards, survey, *rest: {"survey": survey})
    args = ssl_bench.parse_args(["--out", str(tmp_path), "--targets", "--variant", "viewpx a.b=view c=1"])
    (tmp_path / "runs" / "random_backbone").mkdir(parents=True)
    backbones = {"ssl": tmp_path / "runs" / "ssl" / "export" / "backbone", "random": tmp_path / "runs" / "random"}
    result = ssl_bench.targets(args, tmp_path / "shards", backbones, ["data.mix=x"])
    assert sorted(result) == ["targets", "targets viewpx"] and len(result["targets viewpx"]) == 3
    assert made["ssl_viewpx"] == ["data.mix=x", "a.b=view", "c=1"]
    # The MLP head stage on each frozen backbone: the recipe's, the random one and the variant's.
    for name, backbone in [*backbones.items(), ("viewpx", tmp_path / "runs" / "ssl_viewpx" / "export" / "backbone")]:
        assert f'model_overrides=["pretrained={backbone}", "head.hidden_sizes=[512,256]"]' in made[f"mlp_head_{name}"]
    assert read[-1] == ssl_targets.target_runs("viewpx") and read[0] == ssl_targets.TARGET_RUNS
    made["ssl"] = []
    for runs in read:
        for run in runs.values():
            assert run.split("/")[0] in {*made, "random_backbone"}, run


def test_a_kept_run_of_another_recipe_is_refused_by_name(tmp_path):
    """A re-run reuses a kept run only when the run's own config.yaml resolves to what it would train with now."""
    import yaml

    from sharding.config import to_dict
    from train.config import load_train_config
    out = tmp_path / "runs" / "ssl"
    out.mkdir(parents=True)
    settings = ["seed=3", "checkpoint_every=1000000000", "data.mix=sdss=0.5,hst=0.5"]
    saved = load_train_config(ssl_bench.SSL, [*settings, f"out_dir={out}"])
    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(saved), sort_keys=False))  # as train writes it
    ssl_bench.check_recipe(out, ssl_bench.SSL, settings)
    view = "data.loader.views.local_crops.degrade_pixels=view"
    with pytest.raises(ValueError, match=r"data.loader.views.local_crops.degrade_pixels: 'image' -> 'view'"):
        ssl_bench.check_recipe(out, ssl_bench.SSL, [*settings, view])
    with pytest.raises(ValueError, match="another --out"):
        ssl_bench.check_recipe(out, ssl_bench.SSL, ["seed=4", *settings[1:]])
