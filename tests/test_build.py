"""`sharding.build` and `sharding.verify` on mock surveys: rejects, resume, read-back by webdataset, DALI, pyarrow."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from sharding import build, render, verify
from sharding.registry import load_survey
from sharding.writer import index_text

REPO = Path(__file__).resolve().parents[1]


def _build_args(raw: Path, survey: str, out: Path, *extra: str) -> list[str]:
    catalog = raw / Path(load_survey(survey).catalog).name
    return ["--survey", survey, "--catalog", str(catalog), "--images", str(raw / "images"), "--out", str(out),
            "--image-size", "64", "--no-progress", *extra]


def _files(survey_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(survey_dir.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def corrupt_build(mock_surveys, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    raw = mock_surveys["sdss_corrupt"]
    assert build.main(_build_args(raw, "sdss", out, "--samples-per-shard", "8", "--workers", "2")) == 0
    return raw, out / "sdss"


def test_corrupt_inputs_are_rejected_with_reasons_and_nothing_is_lost(corrupt_build):
    raw, survey_dir = corrupt_build
    manifest = json.loads((survey_dir / "manifest.json").read_text())
    rejects = pd.read_parquet(survey_dir / "rejects.parquet")
    catalog = pd.read_csv(raw / Path(load_survey("sdss").catalog).name)
    assert manifest["num_samples"] + len(rejects) == len(catalog)  # every row is a sample or a reject
    reasons = set(rejects["reason"])
    assert {"missing-file", "unreadable", "all-nan", "constant", "nan-votes", "negative-votes",
            "duplicate-id"} <= reasons, reasons
    corruptions = pd.read_csv(raw / "corruptions.csv", dtype=str)
    rejected_ids = set(rejects["object_id"])
    assert set(corruptions["id"]) <= rejected_ids
    missing = rejects[rejects["reason"] == "missing-file"].iloc[0]
    assert "sdss_" in missing["detail"] and missing["row"] >= 0
    assert verify.main([str(survey_dir)]) == 0


def test_labels_parquet_layout(corrupt_build):
    _, survey_dir = corrupt_build
    table = pq.read_table(survey_dir / "labels.parquet")
    labels = table.to_pandas()
    assert labels["key"].is_unique and labels["key"].str.startswith("sdss_").all()
    assert not labels["key"].str.contains(r"[./]").any()
    for col in ("key", "object_id", "ra", "dec", "survey", "split", "shard", "smooth-or-featured_smooth",
                "bar_yes_votes", "bar_total-votes", "native:t01_smooth_or_features_a01_smooth_count"):
        assert col in labels.columns, col
    assert str(table.schema.field("bar_yes").type) == "float"
    smooth = labels[["smooth-or-featured_smooth", "smooth-or-featured_featured-or-disk",
                     "smooth-or-featured_artifact"]].sum(axis=1)
    np.testing.assert_allclose(smooth, 1.0, atol=1e-3)
    manifest = json.loads((survey_dir / "manifest.json").read_text())
    counts = labels.groupby("shard").size().to_dict()
    assert counts == {s["name"]: s["num_samples"] for s in manifest["shards"]}
    for split in ("train", "val", "test"):
        sizes = [s["num_samples"] for s in manifest["shards"] if s["split"] == split]
        assert sizes and all(n == 8 for n in sizes[:-1]) and 1 <= sizes[-1] <= 8, (split, sizes)
    assert set(labels["split"]) <= {"train", "val", "test"}


def test_index_files_match_dali_wds2idx(corrupt_build, tmp_path):
    wds2idx = pytest.importorskip("wds2idx")
    _, survey_dir = corrupt_build
    tar = sorted(survey_dir.glob("*.tar"))[0]
    theirs = tmp_path / "theirs.idx"
    with wds2idx.IndexCreator(str(tar), str(theirs), verbose=False) as creator:
        creator.create_index()
    assert theirs.read_text() == index_text(tar) == tar.with_suffix(".idx").read_text()


def test_read_back_with_webdataset(corrupt_build):
    import webdataset as wds
    _, survey_dir = corrupt_build
    manifest = json.loads((survey_dir / "manifest.json").read_text())
    urls = [str(survey_dir / s["name"]) for s in manifest["shards"]]
    dataset = wds.WebDataset(urls, shardshuffle=False).decode("rgb8").to_tuple("__key__", "jpg")
    samples = list(dataset)
    assert len(samples) == manifest["num_samples"]
    key, image = samples[0]
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8 and image.std() > 0
    labels = pd.read_parquet(survey_dir / "labels.parquet", columns=["key"])
    assert [k for k, _ in samples] == list(labels["key"])


def test_read_back_with_dali_cpu_and_index_files(corrupt_build):
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def, types
    _, survey_dir = corrupt_build
    manifest = json.loads((survey_dir / "manifest.json").read_text())
    shards = [s for s in manifest["shards"] if s["split"] == "train"]
    paths = [str(survey_dir / s["name"]) for s in shards]
    idx = [str(survey_dir / s["index"]) for s in shards]
    total = sum(s["num_samples"] for s in shards)

    @pipeline_def(batch_size=4, num_threads=1, device_id=None)
    def pipe():
        jpg = fn.readers.webdataset(paths=paths, index_paths=idx, ext=["jpg"], missing_component_behavior="error",
                                    random_shuffle=False, name="reader")
        info = fn.pad(fn.get_property(jpg, key="source_info"), fill_value=0, shape=[256])
        return fn.decoders.image(jpg, device="cpu", output_type=types.RGB), info

    p = pipe()
    p.build()
    assert p.epoch_size("reader") == total
    decoded, names = [], []
    for _ in range((total + 3) // 4):
        imgs, info = p.run()
        for i in range(len(imgs)):
            decoded.append(np.array(imgs.at(i)))
            names.append(bytes(np.array(info.at(i))).rstrip(b"\0").decode())
    assert decoded[0].shape == (64, 64, 3)
    labels = pd.read_parquet(survey_dir / "labels.parquet", columns=["key", "split"])
    train_keys = list(labels.loc[labels["split"] == "train", "key"])
    assert any(train_keys[0] in n for n in names[:4])


def test_interrupted_build_resumes_byte_identical(mock_surveys, tmp_path, monkeypatch):
    raw = mock_surveys["hst_corrupt"]
    reference = tmp_path / "reference"
    assert build.main(_build_args(raw, "hst", reference, "--samples-per-shard", "5")) == 0
    calls = {"n": 0}
    real = render.prepare_sample

    def dies_after_17(*a, **k):
        calls["n"] += 1
        if calls["n"] == 17:
            raise KeyboardInterrupt  # stands in for a kill in the middle of a shard
        return real(*a, **k)

    monkeypatch.setattr(render, "prepare_sample", dies_after_17)
    resumed = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        build.main(_build_args(raw, "hst", resumed, "--samples-per-shard", "5"))
    assert not (resumed / "hst" / "manifest.json").exists()
    assert len(list((resumed / "hst").glob("*.tar"))) >= 2  # completed shards survived the interruption
    monkeypatch.setattr(render, "prepare_sample", real)
    calls["n"] = 0
    assert build.main(_build_args(raw, "hst", resumed, "--samples-per-shard", "5")) == 0
    assert _files(resumed / "hst") == _files(reference / "hst")


@pytest.mark.slow
def test_sigkilled_build_resumes_byte_identical(mock_surveys, tmp_path):
    raw = mock_surveys["hst_corrupt"]
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    args = ["--samples-per-shard", "3", "--workers", "2"]
    assert build.main(_build_args(raw, "hst", reference, *args)) == 0
    cmd = [sys.executable, "-m", "sharding.build", *_build_args(raw, "hst", killed, *args)]
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    log = killed / "hst" / "_build" / "progress.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 3):
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "hst" / "manifest.json").exists(), "build finished before it could be killed"
    assert build.main(_build_args(raw, "hst", killed, *args)) == 0
    assert _files(killed / "hst") == _files(reference / "hst")


def test_rerun_overwrite_strict_and_argument_changes(mock_surveys, tmp_path, capsys):
    raw = mock_surveys["hst_corrupt"]
    args = _build_args(raw, "hst", tmp_path)
    assert build.main(args) == 0
    before = _files(tmp_path / "hst")
    assert build.main(args) == 0
    assert "already built" in capsys.readouterr().out
    assert build.main(args + ["--image-size", "32"]) == 2
    assert "different arguments" in capsys.readouterr().err
    assert build.main(args + ["--strict"]) == 1  # same build (nothing redone), but it has rejects
    assert _files(tmp_path / "hst") == before
    assert build.main(args + ["--overwrite", "--strict"]) == 1


def test_missing_catalog_column_fails_at_once(mock_surveys, tmp_path, capsys):
    raw = mock_surveys["hst_corrupt"]
    catalog = raw / Path(load_survey("hst").catalog).name
    from astropy.table import Table
    table = Table.read(catalog)
    table.remove_column("t03_bar_a01_bar_count")
    broken = tmp_path / "broken.fits"
    table.write(broken)
    args = _build_args(raw, "hst", tmp_path / "out")
    args[args.index("--catalog") + 1] = str(broken)
    assert build.main(args) == 2
    err = capsys.readouterr().err
    assert "t03_bar_a01_bar_count" in err and "configs/surveys/hst.yaml" in err


def test_verify_finds_tampering(corrupt_build, tmp_path):
    import shutil
    _, survey_dir = corrupt_build
    copy = tmp_path / "sdss"
    shutil.copytree(survey_dir, copy)
    assert verify.verify_survey(copy) == []
    tar = sorted(copy.glob("*.tar"))[0]
    data = bytearray(tar.read_bytes())
    data[1000] ^= 0xFF
    tar.write_bytes(bytes(data))
    labels = pd.read_parquet(copy / "labels.parquet")
    labels.iloc[1:].to_parquet(copy / "labels.parquet", index=False)
    idx = sorted(copy.glob("*.idx"))[-1]
    header, first, *rest = idx.read_text().splitlines()
    ext, offset, *more = first.split()
    idx.write_text("\n".join([header, " ".join([ext, str(int(offset) + 512), *more]), *rest]) + "\n")
    problems = "\n".join(verify.verify_survey(copy))
    assert "sha256 differs" in problems
    assert "has no row in labels.parquet" in problems
    assert "does not agree" in problems
    assert verify.main([str(copy)]) == 1


def test_keep_float_png_output_and_jpeg_inputs(mock_surveys, tmp_path):
    import io
    from PIL import Image
    raw = mock_surveys["hst_corrupt"]
    out = tmp_path / "float"
    assert build.main(_build_args(raw, "hst", out, "--keep-float", "--image-format", "png")) == 0
    manifest = json.loads((out / "hst" / "manifest.json").read_text())
    assert manifest["members"] == ["png", "npy"]
    tar = out / "hst" / manifest["shards"][0]["name"]
    entry = next(iter(_index_entries(tar)))
    assert set(entry) == {"png", "npy"}
    npy = np.load(io.BytesIO(entry["npy"]))
    assert npy.dtype == np.float16 and npy.shape == (2, 64, 64) and np.isfinite(npy).all()
    assert Image.open(io.BytesIO(entry["png"])).size == (64, 64)
    # Survey cutouts that arrive as JPEGs (as GZ DECaLS and GZ2 releases do) shard through the same path.
    jpegs = tmp_path / "jpegs"
    jpegs.mkdir()
    labels = pd.read_parquet(out / "hst" / "labels.parquet", columns=["object_id"])
    for object_id in labels["object_id"][:5]:
        pixels = np.random.default_rng(0).integers(0, 255, (80, 100, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(jpegs / f"{object_id}.jpg")
    args = _build_args(raw, "hst", tmp_path / "from_jpeg", "--image-pattern", "{id}.jpg")
    args[args.index("--images") + 1] = str(jpegs)
    assert build.main(args) == 0
    jpeg_manifest = json.loads((tmp_path / "from_jpeg" / "hst" / "manifest.json").read_text())
    assert jpeg_manifest["num_samples"] == 5
    rejects = pd.read_parquet(tmp_path / "from_jpeg" / "hst" / "rejects.parquet")
    image_rejects = rejects[rejects["stage"] == "image"]
    assert len(image_rejects) > 0 and (image_rejects["reason"] == "missing-file").all()


def _index_entries(tar_path):
    import tarfile
    with tarfile.open(tar_path) as tar:
        sample = {}
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            if sample and key != sample["__key__"]:
                yield {k: v for k, v in sample.items() if k != "__key__"}
                sample = {}
            sample["__key__"] = key
            sample[ext] = tar.extractfile(member).read()
        yield {k: v for k, v in sample.items() if k != "__key__"}
