"""Per-sample dropout and stochastic depth (models.sample_noise): the same masks on any split of a batch."""

import pytest
import torch
from scipy import stats
from torch import nn

from models.config import load_model_config
from models.head import MorphologyModel
from models.sample_noise import (SampleDropout, SampleDropPath, keep_mask, mix32, per_sample_noise, random_bits,
                                 sample_noise, sample_seeds)
from sharding.schema import load_schema


def _lowbias32(x: int) -> int:
    """Python-integer reference of the hash (Wellons' lowbias32), with no tensor arithmetic."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_hash_matches_a_python_integer_reference():
    values = [0, 1, 2, 12345, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF] + list(range(1000, 100_000, 7919))
    got = mix32(torch.tensor(values, dtype=torch.int64)).tolist()
    assert got == [_lowbias32(v) for v in values]


def test_keep_rate_is_one_minus_p_and_masks_are_independent():
    seeds = sample_seeds(0, 1, torch.arange(64))
    bits = random_bits(seeds, 7, (32, 32), torch.device("cpu"))
    keep = keep_mask(bits, 0.3)
    n, kept = keep.numel(), int(keep.sum())
    assert stats.binomtest(kept, n, 0.7).pvalue > 1e-4, kept / n
    # Another salt (module or call) draws another mask: agreement at chance level, not identity.
    other = keep_mask(random_bits(seeds, 8, (32, 32), torch.device("cpu")), 0.3)
    agree = int((keep == other).sum())
    assert stats.binomtest(agree, n, 0.7 ** 2 + 0.3 ** 2).pvalue > 1e-4
    # Neighbouring samples and elements are not correlated.
    flat = bits.reshape(64, -1).double() / 2 ** 32
    assert abs(torch.corrcoef(torch.stack([flat[:-1].flatten(), flat[1:].flatten()]))[0, 1]) < 0.02
    assert abs(torch.corrcoef(torch.stack([flat[:, :-1].flatten(), flat[:, 1:].flatten()]))[0, 1]) < 0.02


def _model(dropout_overrides: list[str]) -> MorphologyModel:
    torch.manual_seed(0)
    model = MorphologyModel(load_model_config("tiny", dropout_overrides), load_schema())
    return per_sample_noise(model).train()


def test_a_batch_split_anywhere_gets_the_same_dropout_as_the_whole_batch():
    """Backbone hidden dropout, drop path and head dropout: rows 0-7 in one pass equal rows 0-2 + 3-7 in two."""
    model = _model(["backbone.hidden_dropout_prob=0.2", "backbone.drop_path_rate=0.3", "head.dropout=0.4"])
    kinds = {type(m) for m in model.modules()}
    assert SampleDropout in kinds and SampleDropPath in kinds and nn.Dropout not in kinds
    images = torch.randn(8, 3, 56, 56)
    seeds = sample_seeds(3, 5, torch.arange(8))
    with torch.no_grad(), sample_noise(model, seeds):
        whole = model(images)
    with torch.no_grad():
        parts = []
        for rows in (slice(0, 3), slice(3, 8)):
            with sample_noise(model, seeds[rows]):
                parts.append(model(images[rows]))
    assert torch.allclose(torch.cat(parts), whole, atol=1e-5)
    # Dropout is really on: another step's seeds or eval mode give other outputs.
    with torch.no_grad(), sample_noise(model, sample_seeds(3, 6, torch.arange(8))):
        assert not torch.allclose(model(images), whole, atol=1e-3)
    with torch.no_grad():
        assert not torch.allclose(model.eval()(images), whole, atol=1e-3)


def test_drop_path_drops_whole_samples_at_its_rate():
    module = SampleDropPath(0.25).train()
    x = torch.ones(4000, 5, 3)
    with torch.no_grad():
        module.seeds = sample_seeds(0, 1, torch.arange(4000))
        first, second = module(x), module(x)  # two calls in one pass (both residual branches): two masks
        module.seeds = None
    per_sample = first.reshape(4000, -1)
    assert ((per_sample == 0).all(1) | (per_sample == 1 / 0.75).all(1)).all()  # all or nothing per sample
    dropped = int((per_sample[:, 0] == 0).sum())
    assert stats.binomtest(dropped, 4000, 0.25).pvalue > 1e-4
    assert not torch.equal(first, second)


def test_head_dropout_without_hidden_layers_is_applied_not_ignored():
    model = MorphologyModel(load_model_config("cpu", ["head.dropout=0.5"]), load_schema())
    assert any(isinstance(m, nn.Dropout) and m.p == 0.5 for m in model.head.modules())
    bare = MorphologyModel(load_model_config("cpu"), load_schema())  # dropout 0: the bare linear probe as before
    assert [type(m) for m in bare.head] == [nn.Linear]
    torch.manual_seed(1)
    images = torch.randn(4, 3, 64, 64)
    model.train()
    assert not torch.allclose(model(images), model(images))


def test_attention_dropout_is_refused_for_training():
    torch.manual_seed(0)
    model = MorphologyModel(load_model_config("tiny", ["backbone.attention_probs_dropout_prob=0.1"]), load_schema())
    with pytest.raises(ValueError, match="attention_probs_dropout_prob.*world size"):
        per_sample_noise(model)


@pytest.mark.gpu
def test_masks_on_cuda_equal_the_cpu_masks():
    """Integer hashing, no device RNG: a run resumed on another kind of device keeps its dropout draws."""
    seeds = sample_seeds(11, 3, torch.arange(32))
    cpu = random_bits(seeds, 5, (17, 64), torch.device("cpu"))
    assert torch.equal(random_bits(seeds, 5, (17, 64), torch.device("cuda")).cpu(), cpu)
    module = SampleDropout(0.3).train()
    x = torch.ones(32, 17, 64)
    module.seeds, module.calls = seeds, 0
    on_cuda = module(x.cuda()).cpu()
    module.calls = 0  # the same call of the same pass
    assert torch.equal(on_cuda, module(x))
