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


def test_a_bad_setting_and_a_second_backbone_in_one_out_stop_with_the_fix(tmp_path, capsys):
    with pytest.raises(SystemExit):
        ssl_bench.parse_args(["--backbone", "hidden_size"])
    assert "KEY=VALUE" in capsys.readouterr().err
    args = ssl_bench.parse_args(["--out", str(tmp_path / "o"), "--backbone", "hidden_size=96"])
    ssl_bench.check_backbone(args)
    ssl_bench.check_backbone(args)  # the same settings again: fine
    with pytest.raises(ValueError, match="use another --out"):
        ssl_bench.check_backbone(ssl_bench.parse_args(["--out", str(tmp_path / "o")]))
