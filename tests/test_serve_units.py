"""The service's pieces without a server: the micro-batcher, the SLURM batch script, the CLI's settings."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from launch import slurm
from launch.serve_batch import Job, MicroBatcher

def test_micro_batcher_fills_batches_and_sends_big_jobs_alone():
    seen: list[list[int]] = []
    gate = threading.Event()

    def run(jobs):
        gate.wait(5)
        seen.append([job.size for job in jobs])
        for job in jobs:
            job.future.set_result(job.size)

    batcher = MicroBatcher(run, max_batch=4, max_wait_s=0.0)
    first = batcher.submit(Job(torch.zeros(1, 3, 2, 2), "sdss", 0))
    time.sleep(0.05)  # the worker holds the first job at the gate; the rest queue up behind it
    futures = [batcher.submit(Job(torch.zeros(n, 3, 2, 2), "sdss", 0)) for n in (1, 2, 1, 6, 1)]
    gate.set()
    assert [f.result(5) for f in [first, *futures]] == [1, 1, 2, 1, 6, 1]
    batcher.close()
    assert seen == [[1], [1, 2, 1], [6], [1]]


def test_sbatch_serve_script():
    spec = slurm.JobSpec(gpus_per_node=1, ntasks_per_node=1)
    script = slurm.batch_script(spec, "python", "serve", slurm.serve_args(["--model", "m@production", "--port",
                                                                            "8100"]))
    assert "-m launch serve --host 0.0.0.0 --model m@production --port 8100" in script
    assert "port 8100" in script and "--requeue" not in script
    with pytest.raises(ValueError, match="--port"):
        slurm.batch_script(spec, "python", "serve", ["--port", "$(reboot)"])


def test_a_lone_request_does_not_wait_for_company_that_is_not_coming():
    def run(jobs):
        for job in jobs:
            job.future.set_result(len(jobs))

    arriving = [0]
    batcher = MicroBatcher(run, max_batch=8, max_wait_s=0.5, expecting=lambda: arriving[0])
    started = time.perf_counter()
    assert batcher.submit(Job(torch.zeros(1, 3, 2, 2), "sdss", 0)).result(5) == 1
    assert time.perf_counter() - started < 0.25  # nobody was being decoded: no 0.5 s wait
    arriving[0] = 1  # one more on its way that never comes: the wait is bounded by max_wait_s
    started = time.perf_counter()
    assert batcher.submit(Job(torch.zeros(1, 3, 2, 2), "sdss", 0)).result(5) == 1
    assert time.perf_counter() - started >= 0.45
    batcher.close()


def test_cli_settings_and_errors(monkeypatch, eval_exports, capsys):
    from launch import serve

    mixed = eval_exports["mixed"]

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////somewhere/mlflow.db")
    service, app = serve.settings_from(serve.parse_args(["--model", "models:/morphology@production",
                                                         "--max-upload-mb", "2", "--max-files", "5"]))
    assert service.tracking_uri == "sqlite:////somewhere/mlflow.db" and app.max_upload_bytes == 2 * 2**20
    service, _ = serve.settings_from(serve.parse_args(["--model", str(mixed)]))
    assert service.tracking_uri is None  # a folder: no registry, no mlflow
    assert serve.main(["--model", str(mixed / "nothing-here")]) == 2
    assert "not a model export folder" in capsys.readouterr().err
    assert serve.advertised("0.0.0.0", 8000).startswith("http://") and serve.advertised("127.0.0.1", 1) == \
        "http://127.0.0.1:1"
