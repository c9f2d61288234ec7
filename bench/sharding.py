"""Benchmark: sharding.build galaxies/s with 1 and 2 workers against a naive single-process baseline."""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.visualization import make_lupton_rgb
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.report import write_report  # noqa: E402
from sharding import build  # noqa: E402
from sharding.catalog import read_catalog  # noqa: E402
from sharding.mock import main as mock_main  # noqa: E402
from sharding.registry import load_survey  # noqa: E402


def naive_baseline(catalog: Path, images_dir: Path, out_tar: Path, image_size: int) -> int:
    """What one would write first: astropy read, Lupton RGB, PIL resize + JPEG, tarfile; one process."""
    survey = load_survey("sdss")
    ids = read_catalog(catalog)[survey.id_column].astype(str)
    done = 0
    with tarfile.open(out_tar, "w") as tar:
        for object_id in ids:
            path = images_dir / survey.image_pattern.format(id=object_id)
            try:
                with fits.open(path) as hdul:
                    cube = np.nan_to_num(np.asarray(hdul[0].data, dtype=np.float32))
                rgb = make_lupton_rgb(cube[2], cube[1], cube[0], stretch=max(float(cube.std()), 1e-6) * 5, Q=8)
            except Exception:  # noqa: BLE001 - the naive loop skips what it cannot read
                continue
            img = Image.fromarray(rgb).resize((image_size, image_size), Image.BICUBIC)
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=95)
            info = tarfile.TarInfo(f"sdss_{object_id}.jpg")
            info.size = buf.tell()
            buf.seek(0)
            tar.addfile(info, buf)
            done += 1
    return done


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def _build_runner(catalog: Path, images_dir: Path, out: Path, workers: int, image_size: int):
    def run() -> int:
        code = build.main(["--survey", "sdss", "--catalog", str(catalog), "--images", str(images_dir), "--out",
                           str(out), "--workers", str(workers), "--overwrite", "--image-size", str(image_size),
                           "--no-progress"])
        assert code == 0
        return json.loads((out / "sdss" / "manifest.json").read_text())["num_samples"]
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-galaxies", type=int, default=2000)
    parser.add_argument("--cutout-px", type=int, default=256, help="native cutout size of the mock FITS cubes")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=2, help="best of N timings per method")
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "sharding.json")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench_sharding_"))
    rows = []
    try:
        raw = work / "raw"
        mock_main(["--survey", "sdss", "--num-galaxies", str(args.num_galaxies), "--out", str(raw), "--seed", "0",
                   "--workers", "2", "--no-progress", "--set", f"mock.cutout_px={args.cutout_px}"])
        catalog = raw / Path(load_survey("sdss").catalog).name
        # A quarter-size catalog too: the difference between the two timings is the per-galaxy cost
        # without start-up (imports, catalog parsing), which is what a 300k-galaxy survey build sees.
        small = work / "small.csv"
        read_catalog(catalog).iloc[: args.num_galaxies // 4].to_csv(small, index=False)
        methods = [("naive (astropy + PIL + tarfile)", 1,
                    lambda cat: lambda: naive_baseline(cat, raw / "images", work / "naive.tar", args.image_size))]
        methods += [("sharding.build", w, lambda cat, w=w: _build_runner(cat, raw / "images", work / "shards", w,
                                                                           args.image_size)) for w in (1, 2)]
        for name, workers, make in methods:
            full = min(timed(make(catalog)) for _ in range(args.repeats))
            part = min(timed(make(small)) for _ in range(args.repeats))
            rows.append({"method": name, "workers": workers, "seconds": full[0], "galaxies": full[1],
                         "marginal_galaxies_per_s": (full[1] - part[1]) / (full[0] - part[0])})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = rows[0]["galaxies"] / rows[0]["seconds"]
    base_marginal = rows[0]["marginal_galaxies_per_s"]
    print(f"\n{args.num_galaxies} SDSS-like 3-band FITS cubes, {args.cutout_px}px -> {args.image_size}px JPEG, "
          f"{os.cpu_count()} CPUs, {platform.machine()}, best of {args.repeats}")
    print(f"{'method':<34}{'workers':>8}{'galaxies':>9}{'seconds':>9}{'gal/s':>8}{'vs naive':>9}"
          f"{'marginal gal/s':>16}{'vs naive':>9}")
    for row in rows:
        row["galaxies_per_s"] = row["galaxies"] / row["seconds"]
        row["speedup_vs_naive"] = row["galaxies_per_s"] / base
        row["marginal_speedup_vs_naive"] = row["marginal_galaxies_per_s"] / base_marginal
        print(f"{row['method']:<34}{row['workers']:>8}{row['galaxies']:>9}{row['seconds']:>9.2f}"
              f"{row['galaxies_per_s']:>8.1f}{row['speedup_vs_naive']:>8.2f}x{row['marginal_galaxies_per_s']:>16.1f}"
              f"{row['marginal_speedup_vs_naive']:>8.2f}x")
    print("marginal = galaxies/s between a quarter-size and the full catalog (start-up excluded)")
    write_report(args.json, "sharding", rows, num_galaxies=args.num_galaxies, cutout_px=args.cutout_px,
                 image_size=args.image_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
