"""The GPU benchmark in one run (bench/gpu.sh installs what it needs, then calls this): the gpu-marked tests,
ViT-B/14 bf16 ZeRO-2 training (torch backend, pinned memory, non-blocking copies, NCCL), evaluation img/s and
DALI mixed decode + augmentation beside DALI's own reader. Prints one table and writes JSON.

Without CUDA every GPU row is skipped with the reason; --smoke runs the same code paths on the CPU with a tiny
model and a few images (a dry check of this script, not a measurement).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.report import write_report  # noqa: E402

TARGETS = {"data_wait_fraction": 0.05, "mfu": 0.40, "dali_mixed_img_per_s": 7000.0}
H200_BF16_DENSE_TFLOPS = 989.4  # NVIDIA's datasheet figure, dense (the 1,979 figure assumes 2:4 sparsity)


class Bench:
    """Rows of the one table, a time budget, and a work folder."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.rows = args, []
        self.cuda = torch.cuda.is_available()
        self.deadline = time.monotonic() + args.budget_s
        self.work = Path(tempfile.mkdtemp(prefix="bench_gpu_"))

    def add(self, section: str, metric: str, value: float | None, unit: str = "", target: str = "",
            status: str = "", note: str = "") -> None:
        self.rows.append(dict(section=section, metric=metric, value=value, unit=unit, target=target, status=status,
                              note=note))

    def run(self, section: str, part: Callable[[], None], needs_s: float) -> None:
        """One part; its failure (or a spent budget) becomes a row and the next part goes on."""
        left = self.deadline - time.monotonic()
        if left < needs_s:
            self.add(section, "-", None, status="SKIPPED", note=f"{left:.0f} s of the budget left, needs ~{needs_s:.0f}")
            return
        started = time.monotonic()
        try:
            part()
        except Exception as err:  # noqa: BLE001 - a failed part is reported in the table, the others still run
            self.add(section, "-", None, status="FAILED", note=f"{type(err).__name__}: {str(err)[-300:]}")
        print(f"[{section}: {time.monotonic() - started:.0f} s]", flush=True)


def judge(value: float, target: float, higher_is_better: bool, smoke: bool) -> str:
    if smoke:
        return "smoke"
    return "PASS" if (value >= target if higher_is_better else value < target) else "FAIL"


def gpu_tests(b: Bench) -> None:
    """The gpu-marked tests and the dependency-floor tests (this machine's torch/transformers/peft are the floors)."""
    files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                   if "mark.gpu" in p.read_text() or "mark.floors" in p.read_text())
    result = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu or floors", "-q", "-rs", "-p",
                             "no:cacheprovider", *files], cwd=REPO, capture_output=True, text=True, timeout=300)
    print(result.stdout[-4000:], result.stderr[-2000:], flush=True)
    tail = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr[-300:]
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)", tail)}
    ok = result.returncode in (0, 5) and not counts.get("failed") and not counts.get("error")
    status = "PASS" if ok and counts.get("passed") else ("SKIPPED" if ok else "FAIL")
    b.add("gpu tests", "passed", counts.get("passed", 0), target="all pass", status=status,
          note=f"{' '.join(files)}: {tail}" + ("" if b.cuda else " (no CUDA: skipped by conftest)"))


def training(b: Bench, shards: Path) -> None:
    from bench.train import forward_flops_per_image, measured_peak_flops, run_case, summarise
    smoke = not b.cuda
    if smoke:
        case = dict(name="tiny-56-fp32-cpu", model="tiny", image_size=56, batch=8, backend="torch", workers=1,
                    precision="fp32", zero=2, device="cpu")
        steps, warmup, peak = 4, 1, measured_peak_flops("cpu", torch.float32, size=512)
    else:
        case = dict(name="vit-b14-224-bf16-zero2-torch", model="base", image_size=224, batch=b.args.train_batch,
                    backend="torch", workers=b.args.workers, precision="bf16", zero=2, device="gpu")
        steps, warmup = b.args.train_steps, 5
        peak = measured_peak_flops("cuda", torch.bfloat16, size=8192, repeats=20)
    row = summarise(case, run_case(case, shards, b.work, steps, 1), peak, warmup)
    section = f"train {case['name']}"
    b.add(section, "img/s", row["img_per_s"], "img/s", status="smoke" if smoke else "",
          note=f"batch {case['batch']}, median of steps "
          f"{warmup + 1}-{steps}, {'gloo' if smoke else 'NCCL'}, {case['workers']} loader workers")
    b.add(section, "data wait share", row["data_wait_fraction"], "", "< 5%",
          judge(row["data_wait_fraction"], TARGETS["data_wait_fraction"], False, smoke))
    b.add(section, "MFU (measured matmul peak)", row["mfu"], "", ">= 40%", judge(row["mfu"], TARGETS["mfu"], True, smoke),
          note=f"{row['achieved_tflops']:.1f} TFLOP/s of {row['peak_tflops_measured']:.1f} measured")
    if not smoke:
        flops = 3 * forward_flops_per_image(case["model"], case["image_size"])
        datasheet = row["img_per_s"] * flops / (H200_BF16_DENSE_TFLOPS * 1e12)
        b.add(section, "MFU (H200 datasheet bf16 dense)", datasheet, "", note=f"of {H200_BF16_DENSE_TFLOPS} TFLOP/s")


def ssl_training(b: Bench, shards: Path) -> None:
    """Stage ssl as configs/train/ssl.yaml runs it (ViT-B/14, 2 x 224 + 8 x 96 crops, bf16, ZeRO-2), one GPU."""
    from bench.train import forward_flops_per_image, measured_peak_flops
    smoke = not b.cuda
    config, batch, steps, warmup = ("ssl_cpu.yaml", 16, 4, 1) if smoke else ("ssl.yaml", b.args.ssl_batch,
                                                                               b.args.train_steps, 5)
    out = b.work / "ssl"
    overrides = [f"data.loader.shard_root={shards}", "data.mix=sdss=0.33,decals=0.33,hst=0.34",
                 f"data.global_batch_size={batch}", f"max_steps={steps}", "log_every=1", "checkpoint_every=1000000",
                 "val_every=1000000", "ssl.monitor_every=1000000", "data.val_max_samples=64", "ssl.koleo_group_size=16",
                 f"data.loader.num_workers={1 if smoke else b.args.workers}", "optim.warmup_steps=1"]
    if not smoke and not _has_dali():
        overrides += ["data.loader.backend=torch"]  # the GPU path without DALI: torch decode, pinned copies
    cmd = [sys.executable, "-m", "train", "--config", str(REPO / "configs" / "train" / config), "--out-dir", str(out),
           *overrides]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    if result.returncode:
        raise RuntimeError(f"ssl run failed:\n{result.stderr[-2000:]}")
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    timed = [r for r in records if "event" not in r][warmup:]
    step_s = statistics.median(r["step_seconds"] for r in timed)
    wait = statistics.median(r["data_wait_fraction"] for r in timed)
    model, (g, l), counts = ("cpu", (64, 32), (2, 4)) if smoke else ("base", (224, 96), (2, 8))
    # Student forward + backward on every crop, teacher forward on the global crops.
    flops = 3 * (counts[0] * forward_flops_per_image(model, g) + counts[1] * forward_flops_per_image(model, l)) \
        + counts[0] * forward_flops_per_image(model, g)
    peak = measured_peak_flops("cuda" if b.cuda else "cpu", torch.bfloat16 if b.cuda else torch.float32,
                               size=8192 if b.cuda else 512)
    img_s = batch / step_s
    section = f"ssl {'cpu-64+32 smoke' if smoke else 'vit-b14 2x224+8x96 bf16 zero2'}"
    b.add(section, "img/s", img_s, "img/s", status="smoke" if smoke else "",
          note=f"batch {batch}, median of steps {warmup + 1}-{steps}")
    b.add(section, "data wait share", wait, "", "< 5%", judge(wait, TARGETS["data_wait_fraction"], False, smoke))
    b.add(section, "MFU (measured matmul peak)", img_s * flops / peak, "", ">= 40%",
          judge(img_s * flops / peak, TARGETS["mfu"], True, smoke))


def evaluation(b: Bench, shards: Path) -> None:
    from bench.eval import make_export, time_predict
    model, size, batch, device = ("base", 224, 256, "cuda") if b.cuda else ("tiny", 56, 16, "cpu")
    export = make_export(b.work / f"export-{model}", model, size)
    row = time_predict(export, shards, "all", batch, device, b.work)
    dali = _has_dali()
    b.add(f"eval predict {model}-{size}", "img/s", row["predict_img_per_s"], "img/s",
          status="" if b.cuda else "smoke",
          note=f"{row['galaxies']} galaxies, batch {batch}, --device {device}"
               + (", DALI decode" if dali and b.cuda else ", torch decode"))


def _has_dali() -> bool:
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except ModuleNotFoundError:  # no nvidia namespace package at all
        return False


def dali(b: Bench, shards: Path) -> None:
    if not _has_dali():
        b.add("DALI", "-", None, status="SKIPPED", note="no nvidia-dali wheel installed (~424 MB, so it may not fit "
              "the wheel folder): put nvidia_dali_cuda*.whl beside the others to measure it")
        return
    from bench.loaders import best_of_rounds, dali_reader, ours
    device, smoke = ("gpu", False) if b.cuda else ("cpu", True)
    batch, threads = (256, b.args.dali_threads) if b.cuda else (32, 2)
    repeats, mode = (3, "mixed") if b.cuda else (1, "cpu")
    cases = [(f"DALI fn.readers.webdataset, {mode} decode", lambda: dali_reader(shards, batch, device, threads), None),
             (f"ours: DALI backend {mode}, aug on",
              lambda: ours(shards, "dali", 4 if b.cuda else 0, True, batch, device, threads), None)]
    for name, (n, seconds) in best_of_rounds(cases, repeats).items():
        ours_row = name.startswith("ours")
        b.add("DALI 224 px", name, n / seconds, "img/s", ">= 7,000" if ours_row else "",
              judge(n / seconds, TARGETS["dali_mixed_img_per_s"], True, smoke) if ours_row else
              ("smoke" if smoke else ""),
              note=f"{n} images, batch {batch}, {threads} threads, best of {repeats} round-robin")


def print_table(b: Bench) -> None:
    print(f"\nGPU benchmark ({torch.cuda.get_device_name(0) if b.cuda else 'no CUDA GPU: CPU dry check'}), "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs")
    print(f"{'section':<36}{'metric':<40}{'value':>12}  {'target':<10}{'status':<8}note")
    for r in b.rows:
        value = r["value"]
        if value is None:
            text = "-"
        elif r["unit"] == "img/s" or r["metric"] == "passed":
            text = f"{value:,.0f}"
        else:
            text = f"{100 * value:.1f}%"
        print(f"{r['section']:<36}{r['metric']:<40}{text:>12}  {r['target']:<10}{r['status']:<8}{r['note']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="without CUDA: run the code paths on the CPU, tiny")
    parser.add_argument("--shards", type=Path, help="shard root with sdss/decals/hst at 256 px (default: build one)")
    parser.add_argument("--num-galaxies", type=int, default=2000, help="per survey, when building shards (GPU)")
    parser.add_argument("--workers", type=int, default=max(1, min(12, (os.cpu_count() or 2) - 2)),
                        help="loader worker processes for training")
    parser.add_argument("--dali-threads", type=int, default=max(2, min(8, os.cpu_count() or 2)))
    parser.add_argument("--train-batch", type=int, default=256)
    parser.add_argument("--train-steps", type=int, default=40)
    parser.add_argument("--ssl-batch", type=int, default=128, help="global batch of the ssl row (one GPU)")
    parser.add_argument("--budget-s", type=float, default=420, help="parts that no longer fit are skipped")
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "gpu.json")
    args = parser.parse_args(argv)
    b = Bench(args)
    if not b.cuda and not args.smoke:
        print("no CUDA GPU: the GPU parts are skipped (add --smoke to run their code paths on the CPU)")
    try:
        b.run("gpu tests", lambda: gpu_tests(b), 20)
        shards = args.shards
        if b.cuda or args.smoke:
            if shards is None:
                from bench.loaders import make_shards
                shards = b.work / "shards"
                make_shards(b.work, args.num_galaxies if b.cuda else 40, workers=max(1, min(14, os.cpu_count() or 1)))
            b.run("training", lambda: training(b, shards), 90 if b.cuda else 30)
            b.run("ssl training", lambda: ssl_training(b, shards), 90 if b.cuda else 30)
            b.run("evaluation", lambda: evaluation(b, shards), 40 if b.cuda else 20)
            b.run("DALI", lambda: dali(b, shards), 30 if b.cuda else 10)
        else:
            for part in ("training ViT-B/14 bf16 ZeRO-2", "ssl ViT-B/14 2x224+8x96", "evaluation", "DALI mixed decode"):
                b.add(part, "-", None, status="SKIPPED", note="no CUDA GPU")
    finally:
        shutil.rmtree(b.work, ignore_errors=True)
    print_table(b)
    write_report(args.json, "gpu", b.rows, cuda=b.cuda, smoke=not b.cuda,
                 device=torch.cuda.get_device_name(0) if b.cuda else None, torch=torch.__version__)
    return 1 if any(r["status"] == "FAILED" for r in b.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
