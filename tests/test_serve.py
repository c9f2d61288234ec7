"""The morphology service on a real localhost port (uvicorn in a thread), checked against `eval predict`.

A tiny random export and the mock surveys (conftest's eval_shards and eval_exports); the registry tests use a
SQLite-backed MLflow store in tmp_path. Every answer is compared with an independent computation: eval predict's
Parquet for the same JPEGs and FITS, eval.infer on each registered export for the version an answer names, a
DriftMonitor fed the same images for the drift gauges.
"""

from __future__ import annotations

import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import torch
import uvicorn
from astropy.io import fits
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from eval import predict as eval_predict
from eval.drift import DriftMonitor, image_stats, load_reference, save_reference, unnormalise
from eval.drift_job import build_reference
from eval.infer import infer
from eval.source import load_model, open_source
from launch.serve_app import AppSettings, create_app
from launch.serve_service import Service, ServiceSettings
from loaders.evaluation import plain_image
from loaders.source import LoaderConfig
from loaders.shards import SampleReader, load_survey_shards
from sharding.catalog import read_catalog
from sharding.registry import load_survey
from train.world import free_port

MAX_FILES = 24
UPLOAD_LIMIT = AppSettings(max_upload_bytes=2**20, max_files=MAX_FILES)
ATOL = 1e-5


class Server:
    """A Service behind uvicorn on a free port, in a daemon thread."""

    def __init__(self, settings: ServiceSettings, app_settings: AppSettings = UPLOAD_LIMIT) -> None:
        self.service = Service(settings)
        self.url = f"http://127.0.0.1:{free_port()}"
        config = uvicorn.Config(create_app(self.service, app_settings), host="127.0.0.1",
                                port=int(self.url.rsplit(":", 1)[1]), log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.01)
        assert httpx.get(f"{self.url}/healthz").status_code == 200

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.service.close()


def post(url: str, files: list[tuple[str, bytes]], survey: str | None = "sdss", **fields) -> httpx.Response:
    data = {k: str(v) for k, v in fields.items()}
    if survey is not None:
        data["survey"] = survey
    return httpx.post(f"{url}/v1/predict", files=[("file", f) for f in files], data=data, timeout=30)


def metric_samples(url: str) -> dict:
    """{(sample name, sorted labels): value} of /metrics, parsed by prometheus_client's own parser."""
    text = httpx.get(f"{url}/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def shard_jpegs(root: Path, survey: str, split: str) -> dict[str, bytes]:
    info = load_survey_shards(root / survey, split)
    reader = SampleReader([info])
    try:
        return {info.key(s, i): reader.read(0, s, i) for s, count in enumerate(info.shard_counts)
                for i in range(count)}
    finally:
        reader.close()


def fits_bytes(data: np.ndarray, table: bool = False) -> bytes:
    buffer = io.BytesIO()
    hdus = [fits.PrimaryHDU(None if table else data)]
    if table:
        hdus.append(fits.BinTableHDU.from_columns([fits.Column(name="flux", format="E", array=data.ravel()[:8])]))
    fits.HDUList(hdus).writeto(buffer)
    return buffer.getvalue()


def encoded(rgb: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format=fmt)
    return buffer.getvalue()


def features_of(answer: dict, names: list[str]) -> np.ndarray:
    return np.array([[p["features"][n] for n in names] for p in answer["predictions"]])


# --- fixtures -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mixed(eval_exports) -> Path:
    return eval_exports["mixed"]


@pytest.fixture(scope="module")
def sdss(eval_shards, mixed, tmp_path_factory) -> tuple[dict[str, bytes], pd.DataFrame]:
    """sdss train-split JPEGs from the shards, and eval predict's predictions of them."""
    root = eval_shards[1]
    out = tmp_path_factory.mktemp("serve_predict") / "sdss.parquet"
    assert eval_predict.main(["--model", str(mixed), "--shards", str(root), "--surveys", "sdss", "--split", "train",
                              "--out", str(out), "--device", "cpu", "--backend", "torch", "--no-progress"]) == 0
    return shard_jpegs(root, "sdss", "train"), pd.read_parquet(out).set_index("key")


@pytest.fixture(scope="module")
def server(mixed):
    running = Server(ServiceSettings(model=str(mixed), device="cpu", max_batch=8, max_wait_ms=15,
                                     follow_alias_seconds=0))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def good(sdss) -> tuple[str, bytes]:
    key, data = next(iter(sdss[0].items()))
    return key, data


# --- answers equal eval predict's ------------------------------------------------------------------------------

def test_jpeg_answers_equal_eval_predict(server, sdss, mixed):
    jpegs, expected = sdss
    names = open_source(mixed).names
    keys = list(jpegs)[:12]
    answer = post(server.url, [(k + ".jpg", jpegs[k]) for k in keys]).json()
    assert answer["model"]["version"] == "local" and answer["model"]["uri"] == str(mixed)
    assert [p["filename"] for p in answer["predictions"]] == [k + ".jpg" for k in keys]
    np.testing.assert_allclose(features_of(answer, names), expected.loc[keys, names].to_numpy(), atol=ATOL)
    one = post(server.url, [(keys[3], jpegs[keys[3]])]).json()  # alone, not in a batch of 12: the same numbers
    np.testing.assert_allclose(features_of(one, names)[0], expected.loc[keys[3], names].to_numpy(), atol=ATOL)


@pytest.mark.parametrize("survey, cube, gz", [("decals", True, False), ("hst", False, False), ("ukidss", True, True)])
def test_fits_answers_equal_eval_predict_on_the_catalog(server, eval_shards, mixed, tmp_path, survey, cube, gz):
    """FITS in flux rendered like the build: the service's answers are eval predict --catalog's for the same files
    (HST's per-band files sent as one cube, bluest band first; UKIDSS as .fits.gz, a survey the model never saw)."""
    raw = eval_shards[0] / survey
    config = load_survey(survey)
    picked = read_catalog(raw / Path(config.catalog).name).head(4)
    picked.to_parquet(tmp_path / "cat.parquet")
    out = tmp_path / "pred.parquet"
    render_size = server.service.current.decode.render_sizes[survey]
    assert eval_predict.main(["--model", str(mixed), "--catalog", str(tmp_path / "cat.parquet"), "--images",
                              str(raw / "images"), "--survey", survey, "--render-size", str(render_size), "--out",
                              str(out), "--device", "cpu", "--no-progress"]) == 0
    expected = pd.read_parquet(out).set_index("object_id")
    uploads = []
    for oid in expected.index:
        pattern = config.image_pattern.replace("{id}", oid)
        loc = picked.set_index(picked[config.id_column].astype(str))["file_loc"].get(oid) \
            if "file_loc" in picked.columns else None
        if cube:
            uploads.append((oid, (raw / "images" / (loc or pattern)).read_bytes()))
        else:
            planes = [fits.getdata(raw / "images" / pattern.replace("{band}", b)) for b in config.bands]
            uploads.append((oid, fits_bytes(np.stack(planes).astype(np.float32))))
    assert len(uploads) >= 2 and all(data[:2] == b"\x1f\x8b" for _, data in uploads) == gz
    answer = post(server.url, uploads, survey=survey)
    assert answer.status_code == 200, answer.text
    names = open_source(mixed).names
    np.testing.assert_allclose(features_of(answer.json(), names), expected[names].to_numpy(), atol=ATOL)


# --- bad input: a 4xx naming what is wrong, and the next request still works ------------------------------------

@pytest.fixture(scope="module")
def payloads(good) -> dict[str, bytes]:
    big = np.random.default_rng(0).integers(0, 255, (720, 720, 3), dtype=np.uint8)  # ~1.5 MB as PNG
    return {"good": good[1], "half": good[1][:len(good[1]) // 2],
            "small": encoded(np.full((16, 16, 3), 90, np.uint8), "JPEG"),
            "wide": encoded(big[:64, :96], "PNG"), "big": encoded(big, "PNG"), "gif": encoded(big[:64, :64], "GIF"),
            "two planes": fits_bytes(np.random.default_rng(1).normal(size=(2, 64, 64)).astype(np.float32)),
            "nan cube": fits_bytes(np.full((3, 64, 64), np.nan, np.float32)),
            "table": fits_bytes(np.arange(8, dtype=np.float32), table=True)}


def _chunked_over_limit(url: str) -> httpx.Response:
    """No Content-Length: the body is counted as it arrives."""
    boundary = "xyz"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode()

    def body():
        yield head
        for _ in range(24):
            yield b"\0" * 65536
    return httpx.post(f"{url}/v1/predict", content=body(),
                      headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}, timeout=30)


def _bad_cases(p: dict[str, bytes], url: str) -> dict:
    good = p["good"]
    return {
        "no file": (lambda: post(url, [], survey="sdss"), 400, "no-file"),
        "empty file": (lambda: post(url, [("empty.jpg", b"")]), 422, "empty-file"),
        "not an image": (lambda: post(url, [("notes.jpg", b"these are my notes, not a galaxy\n")]), 415,
                         "not-an-image"),
        "truncated jpeg": (lambda: post(url, [("half.jpg", p["half"])]), 422, "corrupt-image"),
        "unknown survey": (lambda: post(url, [("g.jpg", good)], survey="euclid"), 400, "unknown-survey"),
        "missing survey": (lambda: post(url, [("g.jpg", good)], survey=None), 400, "missing-survey"),
        "wrong band count": (lambda: post(url, [("two.fits", p["two planes"])], survey="decals"), 422,
                             "wrong-band-count"),
        "nan-only fits": (lambda: post(url, [("nan.fits", p["nan cube"])], survey="decals"), 422, "all-nan"),
        "too small": (lambda: post(url, [("tiny.jpg", p["small"])]), 422, "too-small"),
        "not square": (lambda: post(url, [("wide.png", p["wide"])]), 422, "not-square"),
        "over the upload limit": (lambda: post(url, [("big.png", p["big"])]), 413, "too-large"),
        "over the limit, chunked": (lambda: _chunked_over_limit(url), 413, "too-large"),
        "too many files": (lambda: post(url, [(f"{i}.jpg", good) for i in range(MAX_FILES + 1)]), 400,
                           "too-many-files"),
        "gif": (lambda: post(url, [("g.gif", p["gif"])]), 415, "unsupported-format"),
        "fits table": (lambda: post(url, [("cat.fits", p["table"])], survey="decals"), 415, "no-image-hdu"),
        "mc without a number": (lambda: post(url, [("g.jpg", good)], mc_samples="many"), 400, "bad-mc-samples"),
    }


CASES = ["no file", "empty file", "not an image", "truncated jpeg", "unknown survey", "missing survey",
         "wrong band count", "nan-only fits", "too small", "not square", "over the upload limit",
         "over the limit, chunked", "too many files", "gif", "fits table", "mc without a number"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gets_a_4xx_and_the_service_keeps_serving(server, good, payloads, case):
    send, status, reason = _bad_cases(payloads, server.url)[case]
    answer = send()
    assert answer.status_code == status, answer.text
    body = answer.json()
    assert body["reason"] == reason and len(body["detail"]) > 20
    if case == "unknown survey":
        assert all(s in body["detail"] for s in ("decals", "hst", "sdss", "ukidss"))
    if case == "wrong band count":
        assert "3 (g, r, z" in body["detail"] and "2 band(s)" in body["detail"]
    after = post(server.url, [("g.jpg", good[1])])
    assert after.status_code == 200 and len(after.json()["predictions"]) == 1


def test_filenames_are_only_echoed_never_opened(server, good, eval_shards):
    """A filename that is the path of a real image on this machine: the upload's bytes decide, not the file."""
    on_disk = next((eval_shards[0] / "decals" / "images").rglob("*.fits"))
    answer = post(server.url, [(str(on_disk), b"not the file at that path")], survey="decals")
    assert answer.status_code == 415 and answer.json()["filename"] == str(on_disk)
    answer = post(server.url, [("../../etc/passwd", good[1])])
    assert answer.status_code == 200 and answer.json()["predictions"][0]["filename"] == "../../etc/passwd"


# --- batching, MC dropout, the model page, metrics -------------------------------------------------------------

def test_concurrent_requests_are_batched_and_answer_as_alone(server, sdss, mixed):
    jpegs, expected = sdss
    names = open_source(mixed).names
    keys = list(jpegs)[:16]
    before = metric_samples(server.url)
    barrier = threading.Barrier(len(keys))

    def one(key):
        with httpx.Client(base_url=server.url) as client:
            barrier.wait()
            return client.post("/v1/predict", files=[("file", (key, jpegs[key]))], data={"survey": "sdss"})

    with ThreadPoolExecutor(len(keys)) as pool:
        answers = list(pool.map(one, keys))
    assert all(a.status_code == 200 for a in answers)
    got = np.concatenate([features_of(a.json(), names) for a in answers])
    np.testing.assert_allclose(got, expected.loc[keys, names].to_numpy(), atol=ATOL)
    after = metric_samples(server.url)
    batches = after[("sommelier_batch_size_count", ())] - before.get(("sommelier_batch_size_count", ()), 0)
    single = after[("sommelier_batch_size_bucket", (("le", "1.0"),))] - \
        before.get(("sommelier_batch_size_bucket", (("le", "1.0"),)), 0)
    assert batches < len(keys) and single < batches, "no micro-batch held more than one galaxy"
    assert after[("sommelier_batch_size_sum", ())] - before.get(("sommelier_batch_size_sum", ()), 0) == len(keys)


def test_mc_dropout_spread_and_model_page(server, good, mixed):
    source = open_source(mixed)
    answer = post(server.url, [("g.jpg", good[1])] * 2, mc_samples=6).json()
    assert answer["mc_samples"] == 6
    std = np.array([[p["std"][n] for n in source.names] for p in answer["predictions"]])
    assert std.shape == (2, len(source.names)) and (std >= 0).all() and std.max() > 0
    plain = post(server.url, [("g.jpg", good[1])]).json()
    np.testing.assert_allclose(features_of(answer, source.names)[0], features_of(plain, source.names)[0], atol=ATOL)
    page = httpx.get(f"{server.url}/v1/model").json()
    spec = source.input_spec()
    assert page["schema"]["names"] == source.names and page["input"]["image_size"] == spec.image_size
    assert page["input"]["mean"] == list(spec.mean) and page["weights_sha256"] == source.record()["weights_sha256"]
    assert page["fits_render"]["sizes"]["decals"] == 64 and page["fits_render"]["sizes"]["ukidss"] == 256
    assert page["drift"]["enabled"] is False and page["provenance"]["mix"] == source.mix
    assert post(server.url, [("g.jpg", good[1])], mc_samples=1000).status_code == 400


def test_metrics_parse_and_count(server, good):
    before = metric_samples(server.url)
    assert post(server.url, [("g.jpg", good[1])]).status_code == 200
    assert post(server.url, [("g.jpg", b"")]).status_code == 422
    after = metric_samples(server.url)
    ok, bad = ("sommelier_requests_total", (("route", "/v1/predict"), ("status", "200"))), \
        ("sommelier_requests_total", (("route", "/v1/predict"), ("status", "422")))
    assert after[ok] - before.get(ok, 0) == 1 and after[bad] - before.get(bad, 0) == 1
    info = [k for k in after if k[0] == "sommelier_model_info" and after[k] == 1]
    assert len(info) == 1 and ("version", "local") in info[0][1]
    assert after[("sommelier_request_seconds_count", (("route", "/v1/predict"),))] >= 2


# --- drift --------------------------------------------------------------------------------------------------------

def test_drift_gauges_equal_a_monitor_fed_the_same_images(eval_shards, mixed, sdss, tmp_path):
    root = eval_shards[1]
    reference, keys = build_reference(mixed, root, ["sdss", "decals"], split="train", max_per_survey=16,
                                      device="cpu")
    path = save_reference(tmp_path / "ref.npz", reference, keys)
    running = Server(ServiceSettings(model=str(mixed), device="cpu", max_batch=8, max_wait_ms=5,
                                     follow_alias_seconds=0, drift_reference=str(path), drift_min_count=4))
    try:
        assert httpx.get(f"{running.url}/v1/model").json()["drift"] == {"enabled": True, "reference": str(path)}
        jpegs = dict(list(shard_jpegs(root, "hst", "train").items())[:10])  # hst: a survey the reference lacks
        for first in range(0, 10, 5):
            chunk = list(jpegs.items())[first:first + 5]
            assert post(running.url, chunk, survey="hst").status_code == 200
        deadline = time.monotonic() + 10
        while metric_samples(running.url).get(("sommelier_drift_images_total", (("survey", "hst"),)), 0) < 10:
            assert time.monotonic() < deadline, "the drift monitor was not fed"
            time.sleep(0.02)
        got = {dict(k[1])["statistic"]: v for k, v in metric_samples(running.url).items()
               if k[0] == "sommelier_drift_score" and dict(k[1])["survey"] == "hst"}
    finally:
        running.stop()
    source = open_source(mixed)
    spec = source.input_spec()
    cfg = LoaderConfig(backend="torch", image_size=spec.image_size, mean=spec.mean, std=spec.std)
    images = torch.stack([plain_image(data, cfg) for data in jpegs.values()])
    monitor = DriftMonitor(load_reference(path), window=256, min_count=4)
    monitor.update("hst", infer(load_model(source), images).embedding,
                   image_stats(unnormalise(images.numpy(), spec.mean, spec.std)))
    expected = {stat: score for (survey, stat), score in monitor.scores().items() if survey == "hst"}
    assert set(got) == set(expected) and {"knn_ratio", "sky", "snr"} <= set(got)
    for stat in expected:
        assert got[stat] == pytest.approx(expected[stat], rel=1e-3, abs=1e-6), stat


# --- promotion under load through the registry -------------------------------------------------------------------

def test_promotion_under_load_loses_no_request(eval_exports, eval_shards, good, tmp_path, mlflow_template):
    """v1 (no drift reference) serves while clients send; v2 (registered with its drift reference) is promoted and
    takes over with no failed request; a rollback is picked up by a forced check (POST /v1/reload)."""
    registry = pytest.importorskip("launch.registry")
    store = registry.open_store(mlflow_template(tmp_path))
    reference, keys = build_reference(eval_exports["mixed"], eval_shards[1], ["sdss"], max_per_survey=8,
                                      device="cpu")
    registry.add(store, eval_exports["sdss_only"], "morphology")
    registry.add(store, eval_exports["mixed"], "morphology",
                 reference=save_reference(tmp_path / "ref.npz", reference, keys))
    registry.promote(store, "morphology", "1", "production")
    running = Server(ServiceSettings(model="models:/morphology@production", device="cpu", max_batch=8,
                                     max_wait_ms=5, follow_alias_seconds=0.1, tracking_uri=store.uri,
                                     cache_dir=str(tmp_path / "cache")))
    answers: list[list[tuple[str, list[float]]]] = [[], []]
    failures: list[str] = []
    stop = threading.Event()

    def client(number: int) -> None:
        with httpx.Client(base_url=running.url, timeout=30) as http:
            while not stop.is_set():
                reply = http.post("/v1/predict", files=[("file", ("g.jpg", good[1]))], data={"survey": "sdss"})
                if reply.status_code != 200:
                    failures.append(reply.text)
                    continue
                body = reply.json()
                answers[number].append((body["model"]["version"], list(body["predictions"][0]["features"].values())))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(2)]
    try:
        assert httpx.get(f"{running.url}/v1/model").json()["drift"]["enabled"] is False
        for thread in threads:
            thread.start()
        _wait(lambda: min(map(len, answers)) >= 5)
        registry.promote(store, "morphology", "2", "production")
        _wait(lambda: all(any(v == "2" for v, _ in a[-3:]) for a in answers) and min(map(len, answers)) >= 10)
        page = httpx.get(f"{running.url}/v1/model").json()
        assert page["version"] == "2" and page["aliases"] == ["production"] and page["drift"]["enabled"] is True
        assert page["tags"]["weights_sha256"] == page["weights_sha256"]
        stop.set()
        for thread in threads:
            thread.join(10)
        running.service.slot.stop()  # no more polling: the rollback is seen by a forced check, as SIGHUP forces one
        registry.rollback(store, "morphology", "production")
        assert httpx.get(f"{running.url}/healthz").json()["model"]["version"] == "2"
        reloaded = httpx.post(f"{running.url}/v1/reload", timeout=30).json()
        assert reloaded["changed"] is True and reloaded["model"]["version"] == "1"
        assert httpx.post(f"{running.url}/v1/reload", timeout=30).json()["changed"] is False
    finally:
        stop.set()
        running.stop()
    assert not failures
    spec = open_source(eval_exports["mixed"]).input_spec()
    cfg = LoaderConfig(backend="torch", image_size=spec.image_size, mean=spec.mean, std=spec.std)
    truth = {version: infer(load_model(open_source(eval_exports[name])), plain_image(good[1], cfg)[None]).fractions[0]
             for version, name in (("1", "sdss_only"), ("2", "mixed"))}
    for sequence in answers:
        versions = [v for v, _ in sequence]
        switch = versions.index("2")
        assert set(versions[:switch]) == {"1"} and set(versions[switch:]) == {"2"}, versions
        for version, features in sequence:  # the version named is the model that computed the answer
            np.testing.assert_allclose(features, truth[version], atol=ATOL)


def _wait(condition, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
