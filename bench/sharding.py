"""Benchmark: sharding.build galaxies/s with 1 and 2 workers against a naive single-process baseline."""

from __future__ import annotations

import argparse
import io
import json
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-galaxies", type=int, default=600)
    parser.add_argument("--cutout-px", type=int, default=256, help="native cutout size of the mock FITS cubes")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=2, help="best of N timings per method")
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "sharding.json")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench_sharding_"))
    try:
        raw = work / "raw"
        mock_main(["--survey", "sdss", "--num-galaxies", str(args.num_galaxies), "--out", str(raw), "--seed", "0",
                   "--workers", "2", "--no-progress", "--set", f"mock.cutout_px={args.cutout_px}"])
        catalog = raw / Path(load_survey("sdss").catalog).name
        rows = []
        best = min(timed(lambda: naive_baseline(catalog, raw / "images", work / "naive.tar", args.image_size))
                   for _ in range(args.repeats))
        rows.append({"method": "naive (astropy + PIL + tarfile)", "workers": 1, "seconds": best[0],
                     "galaxies": best[1]})
        for workers in (1, 2):
            def run() -> int:
                code = build.main(["--survey", "sdss", "--catalog", str(catalog), "--images", str(raw / "images"),
                                   "--out", str(work / "shards"), "--workers", str(workers), "--overwrite",
                                   "--image-size", str(args.image_size), "--no-progress"])
                assert code == 0
                return json.loads((work / "shards" / "sdss" / "manifest.json").read_text())["num_samples"]
            best = min(timed(run) for _ in range(args.repeats))
            rows.append({"method": "sharding.build", "workers": workers, "seconds": best[0], "galaxies": best[1]})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = rows[0]["galaxies"] / rows[0]["seconds"]
    print(f"\n{args.num_galaxies} SDSS-like 3-band FITS cubes, {args.cutout_px}px -> {args.image_size}px JPEG, "
          f"{platform.processor() or platform.machine()}, best of {args.repeats}")
    print(f"{'method':<34}{'workers':>8}{'galaxies':>10}{'seconds':>9}{'gal/s':>9}{'vs naive':>10}")
    for row in rows:
        row["galaxies_per_s"] = row["galaxies"] / row["seconds"]
        row["speedup_vs_naive"] = row["galaxies_per_s"] / base
        print(f"{row['method']:<34}{row['workers']:>8}{row['galaxies']:>10}{row['seconds']:>9.2f}"
              f"{row['galaxies_per_s']:>9.1f}{row['speedup_vs_naive']:>9.2f}x")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"benchmark": "sharding", "num_galaxies": args.num_galaxies,
                                     "cutout_px": args.cutout_px, "image_size": args.image_size,
                                     "machine": {"cpus": __import__("os").cpu_count(),
                                                 "platform": platform.platform()}, "rows": rows}, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
