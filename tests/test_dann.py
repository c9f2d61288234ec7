"""Domain-adversarial training (DANN): the reversal layer, the schedule, the config, target surveys' labels, and
tiny runs (weight 0 is a plain run; an unlabeled target survey feeds the domain loss; resume; 2 processes)."""

import math
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from loaders.loader import LoaderConfig, build_loader
from loaders.sampler import MixConfig
from models.config import DEFAULT_OTHER_QUESTIONS
from models.dann import (DANNConfig, GradientReversal, attach_discriminator, dann_lambda, reverse_gradient,
                         without_discriminator)
from models.head import OutputLayout
from models.losses import batch_loss, loss_count
from sharding import build
from sharding.config import CONFIG_ROOT
from sharding.mock import main as mock_main
from sharding.registry import load_survey
from sharding.schema import load_schema
from train.config import load_train_config
from train.dann import drop_labels, supervised_surveys
from train_cases import REPO, TINY, _command, _env, _events, _overrides, _run, _steps

MIX = "sdss=0.25,decals=0.25,hst=0.25,ukidss=0.25"


def test_reversal_gradient_is_minus_lambda_times_the_plain_gradient():
    torch.manual_seed(0)
    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 3, dtype=torch.float64)
    f = lambda t: torch.tanh(t @ weight).pow(2).sum()  # noqa: E731  a nonlinear loss downstream of the layer
    (plain,) = torch.autograd.grad(f(torch.sin(x)), x)
    for lambda_ in (0.0, 0.37, 1.0):
        y = reverse_gradient(torch.sin(x), lambda_)  # in the middle of the graph, like the pooled features
        assert torch.equal(y, torch.sin(x))  # identity forward
        (reversed_,) = torch.autograd.grad(f(y), x)
        torch.testing.assert_close(reversed_, -lambda_ * plain, rtol=1e-12, atol=0)  # float64 rounding
    (ones,) = torch.autograd.grad(GradientReversal.apply(x, 0.37), x, torch.ones_like(x))
    assert torch.equal(ones, torch.full_like(x, -0.37))


def test_lambda_schedule_is_a_function_of_the_step():
    assert dann_lambda(0, 100, 10.0) == 0.0
    assert dann_lambda(50, 100, 10.0) == pytest.approx(2 / (1 + math.exp(-5)) - 1)
    values = [dann_lambda(s, 100, 10.0) for s in range(101)]
    assert values == sorted(values) and 0.9999 < values[-1] < 1.0
    assert dann_lambda(10, 20, 3.0) == dann_lambda(5, 10, 3.0)  # p = step / max_steps


def test_dann_config_validates_and_overrides_like_every_key():
    cfg = load_train_config(TINY, ["dann.weight=0.1", "dann.target_surveys=[ukidss]", f"data.mix={MIX}"])
    assert cfg.dann == DANNConfig(weight=0.1, target_surveys=["ukidss"]) and cfg.dann.enabled
    assert supervised_surveys(cfg) == ["sdss", "decals", "hst"]
    assert not load_train_config(TINY).dann.enabled  # off by default
    for override, match in (("dann.weight=-1", "dann.weight"), ("dann.gamma=0", "dann.gamma"),
                            ("dann.hidden=0", "dann.hidden"), ("dann.target_surveys=[a,a]", "twice"),
                            ("dann.lambda=1", "unknown key")):
        with pytest.raises(ValueError, match=match):
            load_train_config(TINY, [override])
    with pytest.raises(ValueError, match=r"\['ukidss'\] are not in the mix"):
        supervised_surveys(load_train_config(TINY, ["dann.target_surveys=[ukidss]"]))
    ssl = load_train_config(CONFIG_ROOT / "train" / "ssl_cpu.yaml", ["dann.weight=0.1"])
    with pytest.raises(ValueError, match="supervised stages"):
        supervised_surveys(ssl)


def test_a_target_surveys_labels_add_nothing_to_the_supervised_loss(shard_root):
    """hst (labelled) as a target: the loss sum and label count are those of the batch without its samples."""
    mix = MixConfig(ratios="sdss=0.5,hst=0.5", global_batch_size=12, epoch_samples=12, seed=1)
    loader = build_loader(LoaderConfig(shard_root=str(shard_root), backend="torch", image_size=16, num_workers=0),
                          mix)
    try:
        batch = next(iter(loader))
    finally:
        loader.close()
    layout = OutputLayout(load_schema(), tuple(DEFAULT_OTHER_QUESTIONS))
    logits = torch.randn(len(batch), layout.num_outputs, generator=torch.Generator().manual_seed(0))
    target = batch.survey == 1
    assert 0 < int(target.sum()) < len(batch)
    masked, kept = drop_labels(batch, target), drop_labels(batch, torch.zeros_like(target))
    rest = [i for i in range(len(batch)) if not target[i]]
    for kind in ("mse", "dirichlet"):
        only_rest = batch_loss(kind, logits[rest], _rows(batch, rest), layout, reduction="sum")
        assert batch_loss(kind, logits, masked, layout, reduction="sum") == pytest.approx(float(only_rest), rel=1e-6)
        assert int(loss_count(kind, masked, layout)) == int(loss_count(kind, _rows(batch, rest), layout)) > 0
        assert torch.equal(batch_loss(kind, logits, kept, layout, reduction="sum"),
                           batch_loss(kind, logits, batch, layout, reduction="sum"))


def _rows(batch, rows):
    index = torch.tensor(rows)
    return type(batch)(batch.images[index], batch.features[index], batch.feature_mask[index], batch.votes[index],
                       batch.total_votes[index], batch.survey[index], [batch.keys[i] for i in rows])


def test_the_discriminator_joins_the_model_without_touching_the_global_rng():
    from models.backbone import pooled_size
    from models.config import load_model_config
    from models.head import MorphologyModel
    model = MorphologyModel(load_model_config("tiny")).eval()  # no dropout: the two passes compare exactly
    plain_keys = set(model.state_dict())
    before = torch.get_rng_state()
    attach_discriminator(model, pooled_size(model.config), 8, 4, seed=0)
    assert torch.equal(torch.get_rng_state(), before)
    assert set(without_discriminator(model.state_dict())) == plain_keys
    images = torch.randn(3, 3, 56, 56)
    logits, domain = model(images, with_other=True, domain_lambda=0.5)
    assert domain.shape == (3, 4) and torch.equal(logits, model(images, with_other=True))


def test_a_dann_step_does_not_synchronise_the_host(monkeypatch):
    """The domain term adds no collective and no host wait to a step (its sums wait for a logging step), and its
    gradient reaches the discriminator and, through the reversal layer, the backbone."""
    import torch.distributed as dist
    from loaders.batch import Batch
    from models.config import load_model_config
    from models.head import MorphologyModel
    from train import loop
    from train.objective import build_objective
    from train.world import World

    class Engine:  # what the objective uses of train.engine.Engine, without DeepSpeed
        device, dtype = torch.device("cpu"), torch.float32

        def __init__(self, model):
            self.module = model

        def __call__(self, images, **kwargs):
            return self.module(images, **kwargs)

        def train(self, mode=True):
            self.module.train(mode)

        def backward_step(self, loss):
            loss.backward()

    # Both surveys are targets: no label trains, so the backbone's gradient is the domain loss's alone.
    cfg = load_train_config(TINY, ["grad_accum_steps=2", "stage=full", "data.mix=sdss=0.5,hst=0.5", "dann.weight=1",
                                   "dann.hidden=8", "dann.target_surveys=[sdss,hst]"])
    model = MorphologyModel(load_model_config("tiny"), load_schema())
    objective = build_objective(cfg, World(), load_schema(), model, 2)
    engine = Engine(model)
    objective.attach(engine, print, print)
    run = SimpleNamespace(cfg=cfg, world=World(), engine=engine, step=0, objective=objective,
                          stats=loop.StepStats(torch.device("cpu"), 0, 1, ["sdss", "hst"]))
    n = 4
    batch = Batch(torch.randn(n, 3, 56, 56), torch.rand(n, 26), torch.ones(n, 26, dtype=torch.bool),
                  torch.ones(n, 26), torch.full((n, 9), 26.0), torch.tensor([0, 1, 0, 1]), list("abcd"))

    def forbidden(*args, **kwargs):
        raise AssertionError("host synchronisation in train_step")
    with monkeypatch.context() as patch:
        patch.setattr(torch.Tensor, "item", forbidden)
        patch.setattr(torch.Tensor, "tolist", forbidden)
        reduced = []
        patch.setattr(dist, "all_reduce", lambda tensor, *a, **k: reduced.append(tensor.device))  # world of one
        loop.train_step(run, batch)
    assert reduced == [torch.device("cpu")]  # the label count only
    assert model.discriminator[0].weight.grad.abs().sum() > 0
    assert model.backbone.embeddings.patch_embeddings.projection.weight.grad.abs().sum() > 0
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, *a, **k: None)
    values = objective.log_values(1)
    assert set(values) == {"dann_loss", "dann_acc", "dann_lambda"} and values["dann_loss"] > 0


# ---- tiny runs -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dann_root(shard_root, tmp_path_factory):
    """The session's sdss/decals/hst (linked) and a mock UKIDSS built --unlabeled."""
    raw, root = tmp_path_factory.mktemp("dann_raw"), tmp_path_factory.mktemp("dann_root")
    assert mock_main(["--survey", "ukidss", "--num-galaxies", "48", "--out", str(raw), "--seed", "5",
                      "--no-progress"]) == 0
    for survey in ("sdss", "decals", "hst"):
        (root / survey).symlink_to(shard_root / survey)
    assert build.main(["--survey", "ukidss", "--catalog", str(raw / Path(load_survey("ukidss").catalog).name),
                       "--images", str(raw / "images"), "--out", str(root), "--image-size", "64",
                       "--samples-per-shard", "8", "--no-progress", "--unlabeled"]) == 0
    return root


def _run_together(*commands: list[str]) -> None:
    """Independent runs side by side (one thread each): the file's time is mostly process start-up."""
    with tempfile.TemporaryFile("w+") as errors:
        procs = [subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=errors, text=True)
                 for cmd in commands]
        codes = [proc.wait(timeout=300) for proc in procs]
        errors.seek(0)
        assert codes == [0] * len(procs), errors.read()[-5000:]


def _dann_overrides(root: Path, **extra) -> list[str]:
    return _overrides(root, stage="full", checkpoint_every=2, **{"data.mix": MIX, "dann.weight": 0.5,
                                                               "dann.target_surveys": "[ukidss]", "dann.hidden": 16,
                                                               "dann.gamma": 5.0, **extra})


@pytest.fixture(scope="module")
def dann_runs(dann_root, tmp_path_factory):
    """The same DANN run on one process and on two (torchrun), side by side."""
    folder = tmp_path_factory.mktemp("dann_runs")
    _run_together(_command(1, folder / "one", 4, _dann_overrides(dann_root)),
                  _command(2, folder / "two", 4, _dann_overrides(dann_root)))
    return folder / "one", folder / "two"


@pytest.fixture(scope="module")
def dann_run(dann_runs):
    return dann_runs[0]


def test_weight_zero_is_a_plain_run_step_for_step(shard_root, tmp_path):
    plain, zero = tmp_path / "plain", tmp_path / "zero"
    base = _overrides(shard_root, stage="full", **{"model_overrides": "[head.dropout=0.3]"})
    _run_together(_command(1, plain, 3, base), _command(1, zero, 3, [*base, "dann.weight=0", "dann.gamma=3",
                                                                      "dann.hidden=8"]))
    a, b = _steps(plain), _steps(zero)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        assert b[step]["loss"] == a[step]["loss"] and b[step]["grad_norm"] == a[step]["grad_norm"], step
        assert b[step]["batch_keys_hash"] == a[step]["batch_keys_hash"] and "dann_loss" not in b[step]
    weights_a, weights_b = (load_file(p / "export" / "model.safetensors") for p in (plain, zero))
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


def test_unlabeled_target_feeds_the_domain_loss_logged_each_step(dann_run, dann_root):
    steps = _steps(dann_run)
    assert sorted(steps) == [1, 2, 3, 4]
    for step, record in steps.items():
        assert record["survey_counts"]["ukidss"] == 3 and math.isfinite(record["loss"])
        assert record["dann_lambda"] == pytest.approx(dann_lambda(step, 4, 5.0))
        assert 0.0 <= record["dann_acc"] <= 1.0 and 0.0 < record["dann_loss"] < 10.0
    validation = _events(dann_run, "validation")
    assert set(validation[-1]["surveys"]) == {"sdss", "decals", "hst"}  # nothing to score on ukidss
    # The discriminator is in the engine's module: trained, and in every checkpoint; the export is the plain model.
    states = [torch.load(dann_run / "checkpoints" / tag / "mp_rank_00_model_states.pt", weights_only=False)["module"]
              for tag in ("step00000002", "step00000004")]
    assert states[0]["discriminator.2.weight"].shape == (4, 16)
    assert not torch.equal(states[0]["discriminator.0.weight"], states[1]["discriminator.0.weight"])
    from models.io import load_export
    assert load_export(dann_run / "export").discriminator is None
    assert not [k for k in load_file(dann_run / "export" / "model.safetensors") if "discriminator" in k]


def test_an_unlisted_unlabeled_survey_stays_refused(dann_root, tmp_path):
    from train.loop import setup
    from train.world import World
    cfg = load_train_config(TINY, _dann_overrides(dann_root, **{"dann.target_surveys": "[hst]",
                                                                "out_dir": tmp_path / "run"}))
    with pytest.raises(ValueError, match=r"\['ukidss'\].*built unlabeled.*dann.target_surveys"):
        setup(cfg, World(), None)
    assert not (tmp_path / "run").exists()


def test_resume_continues_the_domain_adversarial_run_exactly(dann_run, dann_root, tmp_path):
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(dann_run / "checkpoints" / "step00000002", resumed / "checkpoints" / "step00000002")
    _run(_command(1, resumed, 4, _dann_overrides(dann_root), resume="auto"))
    ref, res = _steps(dann_run), _steps(resumed)
    assert sorted(res) == [3, 4]
    for step in (3, 4):
        for key in ("batch_keys_hash", "dann_lambda", "loss", "dann_loss", "dann_acc", "grad_norm"):
            assert res[step][key] == ref[step][key], (step, key)


def test_the_domain_loss_is_the_same_on_two_processes(dann_runs):
    one, two = (_steps(out) for out in dann_runs)
    for step in (1, 2, 3, 4):
        assert two[step]["batch_keys_hash"] == one[step]["batch_keys_hash"], step
        for key in ("loss", "dann_loss", "dann_acc", "dann_lambda", "grad_norm"):
            assert two[step][key] == pytest.approx(one[step][key], rel=1e-5, abs=1e-7), (step, key)
