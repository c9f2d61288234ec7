"""Drift monitoring (eval.drift, `python -m eval drift`): image statistics against simulated galaxies of known
sky, noise, flux and size; kNN distances against scipy's k-d tree; the MMD against its definition and its
permutation p-value's false-alarm rate under the null; the online monitor's alerts; the CLI on zarr stores."""

import json
import math
import threading

import numpy as np
import pytest
from scipy import stats as scistats
from scipy.spatial import cKDTree

from eval import __main__ as eval_main
from eval import drift, drift_job, predict
from eval.store import EmbeddingStore, open_embeddings


def gaussian_galaxies(rng, sigmas, flux=4000.0, sky=30.0, noise=4.0, size=64, offset=(1.3, -0.7)):
    """(n, 3, size, size) images: a circular Gaussian of total flux `flux` (per channel) at a sub-pixel offset from
    the centre on a flat sky, independent Gaussian noise per channel."""
    rows, cols = np.mgrid[:size, :size]
    centre = (size - 1) / 2
    out = np.empty((len(sigmas), 3, size, size))
    for i, sigma in enumerate(sigmas):
        profile = np.exp(-((rows - centre - offset[0]) ** 2 + (cols - centre - offset[1]) ** 2) / (2 * sigma**2))
        out[i] = sky + flux / (2 * np.pi * sigma**2) * profile + rng.normal(0.0, noise, (3, size, size))
    return out


@pytest.mark.parametrize("as_uint8", [False, True])
def test_image_stats_recover_sky_noise_snr_and_size_of_gaussian_galaxies(as_uint8):
    rng = np.random.default_rng(0)
    sigmas = np.linspace(1.5, 5.0, 12)
    images = gaussian_galaxies(rng, sigmas)
    if as_uint8:
        images = np.clip(np.round(images), 0, 255).astype(np.uint8)
    found = drift.image_stats(images)
    grey_noise = 4.0 / math.sqrt(3)  # the statistics are of the channel mean
    band = 8  # 64 / 8
    rows, cols = np.mgrid[:64, :64]
    disc_pixels = ((rows - 31.5) ** 2 + (cols - 31.5) ** 2 <= (32 - band) ** 2).sum()
    assert np.all(np.abs(found["size"] / sigmas - 1) < 0.05)
    assert np.all(np.abs(found["sky"] / 30.0 - 1) < 0.02)
    assert np.all(np.abs(found["noise"] / grey_noise - 1) < 0.08)  # one image's MAD: ~3% scatter
    assert abs(found["noise"].mean() / grey_noise - 1) < 0.03
    snr_true = 4000.0 / (grey_noise * math.sqrt(disc_pixels))
    assert abs(found["snr"].mean() / snr_true - 1) < 0.05
    assert set(found) == set(drift.STAT_NAMES) and all(v.shape == (12,) for v in found.values())


def test_image_stats_of_a_blank_image_and_bad_shapes():
    flat = np.full((2, 3, 32, 32), 7, np.uint8)
    found = drift.image_stats(flat)
    assert np.allclose(found["sky"], 7) and np.allclose(found["noise"], drift.NOISE_FLOOR)
    assert np.all(np.isnan(found["size"])) and np.allclose(found["snr"], 0)
    with pytest.raises(ValueError, match="n, C, H, W"):
        drift.image_stats(np.zeros((32, 32)))
    normalised = (np.full((1, 3, 16, 16), 200 / 255) - np.array([0.5, 0.4, 0.3])[None, :, None, None]) / 0.25
    assert np.allclose(drift.unnormalise(normalised, (0.5, 0.4, 0.3), (0.25, 0.25, 0.25)), 200, atol=1e-3)


def test_knn_distances_and_leave_one_out_equal_scipy_kdtree():
    rng = np.random.default_rng(1)
    reference, new = rng.normal(size=(300, 6)), rng.normal(size=(40, 6)) + 0.3
    space = drift.EmbeddingSpace(reference, k=5)
    tree = cKDTree(space.points.astype(np.float64))
    expected, _ = tree.query(space.prepare(new), k=5)
    assert np.allclose(space.distances(new), expected.mean(axis=1), atol=1e-5)
    loo, _ = tree.query(space.points.astype(np.float64), k=6)
    assert np.allclose(space.leave_one_out(), loo[:, 1:].mean(axis=1), atol=1e-5)
    with_nan = new.copy()
    with_nan[3, 0] = np.nan
    assert np.isnan(space.distances(with_nan)[3]) and np.isfinite(np.delete(space.distances(with_nan), 3)).all()
    with pytest.raises(ValueError, match="dimensions"):
        space.distances(rng.normal(size=(3, 7)))


def test_mmd_equals_its_definition():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(12, 4)), rng.normal(size=(9, 4)) + 0.5
    x, y = x / np.linalg.norm(x, axis=1, keepdims=True), y / np.linalg.norm(y, axis=1, keepdims=True)
    mmd2, _, bandwidth = drift.mmd_permutation_test(x, y, permutations=10)
    pooled = np.concatenate([x, y])
    dist = np.linalg.norm(pooled[:, None] - pooled[None], axis=2)
    assert bandwidth == pytest.approx(np.median(dist[~np.eye(21, dtype=bool)]))
    k = np.exp(-dist**2 / (2 * bandwidth**2))
    kxx, kyy, kxy = k[:12, :12], k[12:, 12:], k[:12, 12:]
    direct = ((kxx.sum() - 12) / (12 * 11) + (kyy.sum() - 9) / (9 * 8) - 2 * kxy.mean())
    assert mmd2 == pytest.approx(direct, rel=1e-9)


def test_null_p_values_are_uniform_and_a_shift_is_detected():
    """50 null repetitions at small n: the share of p < 0.05 lies in the Binomial(50, 0.05) 99.9% interval for the
    MMD and the Mann-Whitney test (the false-alarm rate measured); a mean shift is found, every time."""
    rng = np.random.default_rng(3)
    mmd_p, mw_p, verdicts = [], [], []
    for rep in range(50):
        reference, new = rng.normal(size=(60, 5)), rng.normal(size=(30, 5))
        out = drift.compare_embeddings(reference, new, k=5, permutations=399, seed=rep)
        mmd_p.append(out["mmd_p"])
        mw_p.append(out["mann_whitney_p"])
        verdicts.append(out["drift"])
    low, high = scistats.binom.ppf([0.0005, 0.9995], 50, 0.05)
    for p_values in (np.array(mmd_p), np.array(mw_p)):
        assert low <= np.sum(p_values < 0.05) <= high
        assert scistats.kstest(p_values, "uniform").pvalue > 0.001
    assert np.sum(verdicts) <= scistats.binom.ppf(0.9995, 50, 0.01)
    for rep in range(3):
        reference, new = rng.normal(size=(200, 16)), rng.normal(size=(60, 16))
        new[:, 0] += 1.5  # a mean shift: the MMD finds it (the kNN distance need not: the density there is alike)
        out = drift.compare_embeddings(reference, new, permutations=499, seed=rep)
        assert out["drift"] and out["mmd_p"] < 0.005
    centres = rng.normal(size=(4, 16))  # galaxies of 3 kinds in the reference; a 4th, unseen kind arrives
    reference = centres[np.arange(240) % 3] + 0.3 * rng.normal(size=(240, 16))
    new = centres[3] + 0.3 * rng.normal(size=(60, 16))
    out = drift.compare_embeddings(reference, new, permutations=499)
    assert out["drift"] and out["knn_ratio"] > 1.2 and out["mann_whitney_p"] < 1e-4
    with pytest.raises(ValueError, match="permutations"):
        drift.compare_embeddings(reference, new, permutations=199)  # its smallest p-value, 1/200, never < alpha/2


CENTRES = np.random.default_rng(99).normal(size=(4, 8))  # 3 kinds of galaxy in the reference, a 4th unseen


def _embeddings(rng, n, unseen=False):
    kinds = np.full(n, 3) if unseen else rng.integers(0, 3, n)
    return CENTRES[kinds] + 0.3 * rng.normal(size=(n, 8))


def _reference(rng, surveys=("sdss",), n=400, skies=(10.0,)):
    parts = [drift.Reference(_embeddings(rng, n), {"sky": rng.normal(sky, 1.0, n), "size": rng.normal(3, .5, n)},
                             np.full(n, survey)) for survey, sky in zip(surveys, skies)]
    return drift.Reference(np.concatenate([p.embeddings for p in parts]),
                           {k: np.concatenate([p.stats[k] for p in parts]) for k in ("sky", "size")},
                           np.concatenate([p.surveys for p in parts]))


def _feed(monitor, rng, survey, batches, unseen=False, sky=10.0):
    for _ in range(batches):
        monitor.update(survey, _embeddings(rng, 16, unseen), {"sky": rng.normal(sky, 1.0, 16),
                                                              "size": rng.normal(3, .5, 16)})


def test_monitor_alerts_once_per_crossing_rearms_and_compares_each_survey_with_its_own_rows():
    rng = np.random.default_rng(4)
    # Two reference surveys with different skies: each stream is judged against its own survey's rows.
    reference = _reference(rng, ("sdss", "decals"), skies=(10.0, 20.0))
    alerts = []
    monitor = drift.DriftMonitor(reference, window=64, min_count=32, alert=alerts.append)
    _feed(monitor, rng, "sdss", 1)
    assert all(math.isnan(v) for v in monitor.scores().values())  # 16 < min_count
    _feed(monitor, rng, "sdss", 15)
    _feed(monitor, rng, "decals", 16, sky=20.0)
    scores = monitor.scores()
    assert not alerts, alerts
    assert set(scores) == {(s, n) for s in ("sdss", "decals") for n in (drift.KNN, "sky", "size")}
    assert abs(scores[("sdss", drift.KNN)] - 1) < 0.1 and scores[("decals", "sky")] < 0.5
    _feed(monitor, rng, "sdss", 12, sky=13.0)  # sdss's sky moves by 3 sigma ~ 2.2 IQR
    assert len(alerts) == 1 and "'sdss'" in alerts[0] and "sky" in alerts[0] and "threshold 0.8" in alerts[0]
    assert monitor.firing() == {("sdss", "sky")}
    _feed(monitor, rng, "sdss", 12)  # back to normal: re-armed
    assert monitor.firing() == set() and len(alerts) == 1
    _feed(monitor, rng, "sdss", 12, unseen=True, sky=13.0)  # both drift now: one alert each
    assert len(alerts) == 3 and {("sdss", "sky"), ("sdss", drift.KNN)} == monitor.firing()
    _feed(monitor, rng, "ukidss", 4, sky=30.0)  # a survey the reference lacks: against all its rows (sky ~15)
    assert "all reference rows" in alerts[-1] and "'ukidss'" in alerts[-1]


def test_monitor_is_thread_safe_and_checks_its_inputs():
    rng = np.random.default_rng(5)
    monitor = drift.DriftMonitor(_reference(rng), window=32, min_count=8, thresholds={"sky": 5.0}, alert=lambda m: 0)
    errors = []

    def work(seed):
        try:
            local = np.random.default_rng(seed)
            for _ in range(20):
                _feed(monitor, local, f"s{seed % 2}", 1)
                monitor.scores()
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and all(np.isfinite(v) for v in monitor.scores().values())
    with pytest.raises(ValueError, match="unknown drift statistics"):
        drift.DriftMonitor(_reference(rng), thresholds={"brightness": 1.0})
    with pytest.raises(ValueError, match="3 values for 16"):
        monitor.update("sdss", _embeddings(rng, 16), {"sky": np.zeros(3)})


def _store(path, keys, vectors, surveys):
    store = EmbeddingStore(path, vectors.shape[1], "float32", new=True)
    store.write(0, keys, vectors)
    store.add_run({"inputs": {"manifests": {s: "x" for s in surveys}}})
    return path


def test_reference_file_and_store_round_trip(tmp_path):
    rng = np.random.default_rng(6)
    reference = _reference(rng, ("sdss", "decals"), n=50, skies=(10.0, 20.0))
    path = drift.save_reference(tmp_path / "ref.npz", reference, [f"k{i}" for i in range(100)])
    back = drift.load_reference(path, max_rows=None)
    assert np.allclose(back.embeddings, reference.embeddings, atol=1e-6)
    assert list(back.surveys) == list(reference.surveys) and np.allclose(back.stats["sky"], reference.stats["sky"])
    few = drift.load_reference(path, max_rows=30, seed=1, surveys=["decals"])
    assert len(few.embeddings) == 30 and set(few.surveys) == {"decals"} and len(few.stats["size"]) == 30
    keys = [f"sdss_{i}" for i in range(20)] + [f"sdss_as_hst_{i}" for i in range(10)]
    store = _store(tmp_path / "e.zarr", keys, rng.normal(size=(30, 4)).astype(np.float32), ["sdss", "sdss_as_hst"])
    from_store = drift.load_reference(store)
    assert from_store.stats == {} and list(from_store.surveys) == ["sdss"] * 20 + ["sdss_as_hst"] * 10
    with pytest.raises(ValueError, match="does not exist"):
        drift.load_reference(tmp_path / "missing.npz")


def test_drift_cli_on_zarr_stores(tmp_path, capsys):
    rng = np.random.default_rng(7)
    dims = 16
    train = _store(tmp_path / "train.zarr", [f"sdss_{i}" for i in range(400)],
                   rng.normal(size=(400, dims)).astype(np.float32), ["sdss"])
    other = rng.normal(size=(80, dims))
    other[:, :4] += 0.8
    new = _store(tmp_path / "new.zarr", [f"sdss_{i}" for i in range(400, 480)] + [f"ukidss_{i}" for i in range(80)],
                 np.concatenate([rng.normal(size=(80, dims)), other]).astype(np.float32), ["sdss", "ukidss"])
    out = tmp_path / "drift.json"
    argv = ["drift", "--reference", str(train), "--embeddings", str(new), "--surveys", "sdss,ukidss", "--out",
            str(out), "--permutations", "400"]
    assert eval_main.main(argv) == 0
    report = json.loads(out.read_text())
    by_survey = {r["survey"]: r for r in report["results"]}
    assert not by_survey["sdss"]["drift"] and by_survey["ukidss"]["drift"] and report["drift"]
    assert by_survey["ukidss"]["num_new"] == 80 and by_survey["sdss"]["num_reference"] == 400
    printed = capsys.readouterr().out
    assert "sdss: NO DRIFT" in printed and "ukidss: DRIFT" in printed
    assert drift_job.main(argv[1:] + ["--fail-on-drift"]) == 1
    assert drift_job.main(argv[1:3] + ["--embeddings", str(new), "--surveys", "hst"]) == 2
    assert "no embeddings of survey 'hst'" in capsys.readouterr().err


def test_drift_reference_reads_like_eval_predict(eval_shards, eval_exports, tmp_path, capsys):
    _, root = eval_shards
    model = eval_exports["sdss_only"]
    out = tmp_path / "ref.npz"
    assert eval_main.main(["drift", "reference", "--model", str(model), "--shards", str(root), "--surveys",
                           "sdss,hst", "--split", "train", "--out", str(out), "--max", "12", "--no-progress",
                           "--device", "cpu"]) == 0
    assert "sdss: 12 galaxies" in capsys.readouterr().out
    reference = drift.load_reference(out)
    assert list(reference.surveys) == ["sdss"] * 12 + ["hst"] * 12 and set(reference.stats) == set(drift.STAT_NAMES)
    assert reference.meta["model"]["weights_sha256"] and reference.meta["split"] == "train"
    # The same galaxies through eval predict give the same embeddings.
    assert all(np.isfinite(reference.stats[name]).all() for name in ("sky", "noise", "snr"))
    keys = np.load(out)["keys"].tolist()
    assert predict.main(["--model", str(model), "--shards", str(root), "--surveys", "hst", "--split", "train",
                         "--out", str(tmp_path / "p.parquet"), "--embeddings", str(tmp_path / "p.zarr"),
                         "--embeddings-dtype", "float32", "--device", "cpu", "--no-progress"]) == 0
    array, predicted_keys, _ = open_embeddings(tmp_path / "p.zarr")
    rows = [predicted_keys.index(k) for k in keys[12:]]
    assert np.allclose(reference.embeddings[12:], np.asarray(array[:])[rows], atol=1e-5)
