"""Benchmark: the morphology service under a bounded load on localhost (p50/p99 latency, throughput).

Each (model, batching) pair is one `python -m launch serve` subprocess; N client threads (httpx, keep-alive) send a
fixed number of one-galaxy requests (a mock DECaLS galaxy rendered as the build renders it, at the model's input
size) and time each one end to end. The server and the client are pinned to the same --cores CPUs, so the client's
own work is counted against the service as it would be on a machine that runs both. Random weights: latency does
not depend on them. Target: p99 < 100 ms per one-galaxy request at concurrency 8 on 2 CPU cores for the cpu model.

  python bench/serve.py                                   # cpu and tiny models, concurrency 1, 8, 32, batching on/off
  python bench/serve.py --model-config base --image-size 224 --device cuda --concurrency 8,32  # bench/gpu.sh's row
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.report import write_report  # noqa: E402
from models.config import load_model_config  # noqa: E402
from models.head import MorphologyModel  # noqa: E402
from models.io import save_export  # noqa: E402
from sharding.mock import main as mock_main  # noqa: E402
from sharding.render import prepare_sample  # noqa: E402
from train.world import free_port  # noqa: E402

# configs/train/cpu.yaml's normalisation (the mock surveys' pixel statistics); the tiny model takes the same.
MEAN, STD = [0.101, 0.082, 0.068], [0.161, 0.127, 0.089]
BATCHING = {"on": (32, 5.0), "off": (1, 0.0)}  # (--max-batch, --max-wait-ms)


def make_export(folder: Path, model: str, image_size: int | None = None) -> tuple[Path, int]:
    """Random weights saved as training exports them, at `image_size` (default: the model config's own)."""
    torch.manual_seed(0)
    config = load_model_config(model)
    size = image_size or config.backbone.image_size
    # As if trained on decals shards built at the input size: the service renders FITS at that size.
    metadata = {"stage": "full", "step": 0, "mix": [["decals", 1.0]],
                "surveys": {"decals": {"image_size": size, "image_format": "jpg"}},
                "input": {"image_size": size, "mean": MEAN, "std": STD}}
    return save_export(MorphologyModel(config), folder, metadata=metadata), size


def galaxies(work: Path, count: int) -> list[Path]:
    """Mock DECaLS FITS cutouts (96 px, g r z), as the survey's images folder holds them."""
    raw = work / "raw"
    assert mock_main(["--survey", "decals", "--num-galaxies", str(count), "--out", str(raw), "--seed", "0",
                      "--no-progress"]) == 0
    return sorted((raw / "images").rglob("*.fits"))[:count]


def start_server(export: Path, port: int, batching: str, args, log: Path) -> subprocess.Popen:
    max_batch, wait_ms = BATCHING[batching]
    cmd = [sys.executable, "-m", "launch", "serve", "--model", str(export), "--port", str(port), "--device",
           args.device, "--max-batch", str(max_batch), "--max-wait-ms", str(wait_ms), "--follow-alias-seconds", "0"]
    if args.workers_threads:
        cmd += ["--workers-threads", str(args.workers_threads)]
    cores = args.cpu_set
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=lambda: os.sched_setaffinity(0, cores))
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the server did not start: {log.read_text()[-2000:]}")
        time.sleep(0.2)


def load(url: str, payloads: list[tuple[str, bytes, str]], concurrency: int, requests: int) -> dict:
    """`requests` one-galaxy requests from `concurrency` threads; each request's latency, and the wall time."""
    latencies: list[float] = []
    failures: list[str] = []
    counter = iter(range(requests))
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(base_url=url, timeout=60) as http:
            while True:
                with lock:
                    number = next(counter, None)
                if number is None:
                    return
                name, data, survey = payloads[number % len(payloads)]
                started = time.perf_counter()
                reply = http.post("/v1/predict", files=[("file", (name, data))], data={"survey": survey})
                elapsed = time.perf_counter() - started
                with lock:
                    (latencies if reply.status_code == 200 else failures).append(
                        elapsed if reply.status_code == 200 else reply.text[:200])

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    if failures:
        raise RuntimeError(f"{len(failures)} requests failed, e.g. {failures[0]}")
    ms = np.array(latencies) * 1000
    return {"requests": requests, "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean()), "max_ms": float(ms.max()), "throughput_rps": requests / wall}


def batch_stats(url: str) -> dict:
    """Mean micro-batch size so far, from the service's own histogram."""
    text = httpx.get(f"{url}/metrics").text
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
              if line.startswith(("sommelier_batch_size_sum", "sommelier_batch_size_count"))}
    return values


def run_case(export: Path, model: str, size: int, batching: str, payloads, args, work: Path) -> list[dict]:
    port = free_port()
    proc = start_server(export, port, batching, args, work / f"{model}-{batching}.log")
    url = f"http://127.0.0.1:{port}"
    rows = []
    try:
        load(url, payloads, 4, args.warmup)
        for concurrency in args.concurrency:
            before = batch_stats(url)
            row = load(url, payloads, concurrency, args.requests)
            after = batch_stats(url)
            batches = after["sommelier_batch_size_count"] - before["sommelier_batch_size_count"]
            row.update(model=model, image_size=size, input=payloads[0][0].rsplit(".", 1)[-1], batching=batching,
                       max_batch=BATCHING[batching][0], concurrency=concurrency, device=args.device,
                       mean_batch=(after["sommelier_batch_size_sum"] - before["sommelier_batch_size_sum"])
                       / max(batches, 1))
            rows.append(row)
            print(_line(row), flush=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
    return rows


def _line(r: dict) -> str:
    return (f"{r['model']:<6}{r['image_size']:>5}{r['input']:>6}{r['batching']:>9}{r['concurrency']:>6}"
            f"{r['p50_ms']:>9.1f}{r['p99_ms']:>9.1f}{r['throughput_rps']:>9.1f}{r['mean_batch']:>8.2f}")


HEADER = (f"{'model':<6}{'px':>5}{'input':>6}{'batching':>9}{'conc':>6}{'p50 ms':>9}{'p99 ms':>9}{'req/s':>9}"
          f"{'batch':>8}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-config", default="cpu,tiny", help="comma-separated configs/models names")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--image-size", type=int, help="model input size (default: each model config's own: cpu 64, "
                                                       "tiny 224)")
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated client thread counts")
    parser.add_argument("--requests", type=int, default=300, help="one-galaxy requests per concurrency level")
    parser.add_argument("--warmup", type=int, default=40, help="untimed requests after each server start")
    parser.add_argument("--batching", default="on,off", help="on: --max-batch 32 --max-wait-ms 5; off: --max-batch 1")
    parser.add_argument("--fits", action="store_true", help="also the cpu model fed FITS (rendered by the service)")
    parser.add_argument("--cores", type=int, default=2, help="CPUs the server and the client share")
    parser.add_argument("--workers-threads", type=int, help="the server's torch threads (default: torch's)")
    parser.add_argument("--note", default="", help="written into the JSON (e.g. 'shared machine')")
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "serve.json")
    args = parser.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.cpu_set = set(sorted(os.sched_getaffinity(0))[:args.cores])
    os.sched_setaffinity(0, args.cpu_set)
    work = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    rows = []
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    try:
        cutouts = galaxies(work, 32)
        print(f"{len(args.cpu_set)} CPUs shared by server and client ({platform.machine()}, "
              f"{os.cpu_count()} on the machine), load average before {load_before:.2f}\n{HEADER}", flush=True)
        for model in args.model_config.split(","):
            export, size = make_export(work / model, model, args.image_size)
            jpegs = [(p.stem + ".jpg", prepare_sample([p], image_size=size)["jpg"], "decals") for p in cutouts]
            for batching in args.batching.split(","):
                rows += run_case(export, model, size, batching, jpegs, args, work)
            if args.fits and model == "cpu":
                fits = [(p.name, p.read_bytes(), "decals") for p in cutouts]
                rows += run_case(export, model, size, "on", fits, args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{HEADER}\n" + "\n".join(map(_line, rows)))
    print("one galaxy per request; p50/p99 of each request's time as the client sees it (upload, decode, queue, "
          f"forward, answer); batch = mean galaxies per forward; {time.perf_counter() - started:.0f} s in all")
    write_report(args.json, "serve", rows, cores=len(args.cpu_set), device=args.device, requests=args.requests,
                 load_average_before=load_before, load_average_after=os.getloadavg()[0], note=args.note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
