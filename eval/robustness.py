"""`python -m eval robustness`: metrics and prediction shifts under controlled image perturbations.

Each perturbation acts on the decoded shard image (8-bit rendering, 0..255) before the model's resize and
normalisation: apparent size (resolution scaling), added noise at a set peak signal-to-noise, extra PSF blur
in arcsec, rotations and flips (a morphology model should be nearly invariant to the last). Where float pixels
are at hand (the source FITS the build read, else the shards' .npy members), noise and PSF act in flux before
the stretch instead, with sharding.flux's operations, and the image is rendered again as the build renders it;
the JSON's "pixels" says which space each kind used and why. With MC dropout,
the calibration of predictive intervals for each galaxy's vote counts: the model's MC spread plus the vote noise
of that galaxy's N volunteers (binomial for an MSE model, Dirichlet-multinomial for a Dirichlet one).
"""

from __future__ import annotations

import argparse
import io
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from eval import metrics as m, reading, source as sources
from eval.infer import check_mc, infer, resolve_device
from eval.labels import label_mask, read_labels
from eval.score import cell, write_json
from loaders.augment import antialias_sigma, gaussian_blur, warp_affine
from loaders.loader import LoaderConfig
from loaders.shards import SampleReader, load_survey_shards
from models.head import concentrations, fractions
from sharding import flux, images, render
from sharding.registry import load_survey
from sharding.schema import total_votes_column, votes_column

EXAMPLES = """examples:
  python -m eval robustness --model runs/mixed --shards data/shards --survey sdss --out reports/robust
  python -m eval robustness --model runs/mixed --shards data/shards --survey hst --mc-samples 20 --max-galaxies 2000"""
SETTINGS = {
    "resolution": [0.5, 0.71, 1.0, 1.41, 2.0],  # apparent size factor (1 = as observed)
    "noise": [0.0, 50.0, 20.0, 10.0, 5.0],  # peak S/N of the added noise (0 = none added)
    "psf": [0.0, 0.5, 1.0, 2.0],  # extra PSF FWHM in arcsec
    "rotation": ["none", "rot45", "rot90", "rot180", "hflip", "vflip"],
}
FWHM_PER_SIGMA = flux.FWHM_PER_SIGMA
IDENTITY = {"resolution": 1.0, "noise": 0.0, "psf": 0.0, "rotation": "none"}  # the strength that changes nothing
FLUX_KINDS = ("noise", "psf")  # the kinds that act in flux, before the stretch, where float pixels are at hand


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m eval robustness", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Score a model on one survey under resolution scaling (0.5x-2x apparent size), added noise at "
                    "set peak signal-to-noise levels, extra PSF blur in arcsec (through the survey's pixel scale) "
                    "and rotations/flips: mean r and MAE with 95%% intervals and the mean shift of the predictions "
                    "against the unperturbed ones, per strength. With --mc-samples, the calibration of predictive "
                    "intervals for each galaxy's votes (MC-dropout spread plus the vote noise of its N volunteers: "
                    "coverage against nominal). Unreadable samples are listed in <out>/rejects.parquet.")
    parser.add_argument("--model", required=True, help="a training run folder or its export")
    parser.add_argument("--shards", required=True, help="shard root")
    parser.add_argument("--survey", required=True)
    parser.add_argument("--split", default="test", choices=("test", "val", "train"))
    parser.add_argument("--max-galaxies", type=int, default=1000, help="first N galaxies of the split")
    parser.add_argument("--native-pixels", type=int,
                        help="width in pixels of the survey's original cutouts, which the shards resampled (default: "
                             "the survey YAML's mock cutout size); sets the arcsec per shard pixel for --psf")
    parser.add_argument("--space", choices=("auto", "8bit"), default="auto",
                        help="auto: noise and PSF act in flux before the stretch where float pixels are at hand (the "
                             "source FITS the build read, else .npy members from --keep-float), on the 8-bit images "
                             "otherwise; 8bit: every perturbation on the 8-bit images")
    parser.add_argument("--mc-samples", type=int, default=0, help="MC dropout passes for the calibration curve")
    parser.add_argument("--bootstrap", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--out", default="reports/robustness", help="folder for robustness.json and the plots")
    parser.add_argument("--max-error-rate", type=float, default=reading.MAX_ERROR_RATE,
                        help="share of unreadable samples past which the job stops (as training's loader)")
    return parser.parse_args(argv)


def _about_centre(linear: np.ndarray, h: int, w: int) -> np.ndarray:
    """Output -> source matrix applying `linear` about the image centre (warp_affine's convention)."""
    centre = np.array([w / 2.0, h / 2.0])
    return np.hstack([linear, (centre - linear @ centre)[:, None]])


def perturbation(kind: str, strength, arcsec_per_px: float, seed: int):
    """(image (3, H, W) 0..255, row) -> perturbed image, for one kind and strength."""
    def apply(image: torch.Tensor, row: int) -> torch.Tensor:
        _, h, w = image.shape
        if kind == "resolution" and strength != 1.0:
            if strength < 1.0 and antialias_sigma(1.0 / strength) > 0:
                image = gaussian_blur(image, antialias_sigma(1.0 / strength))
            image = warp_affine(image, _about_centre(np.eye(2) / strength, h, w), (h, w))
        elif kind == "noise" and strength > 0:
            light = image.mean(dim=0)
            sigma = float(light.max() - light.median()) / strength
            rng = torch.Generator().manual_seed(seed * 1_000_003 + row)
            image = (image + sigma * torch.randn(image.shape, generator=rng)).clamp(0.0, 255.0)
        elif kind == "psf" and strength > 0:
            image = gaussian_blur(image, strength / FWHM_PER_SIGMA / arcsec_per_px)
        elif kind == "rotation" and strength != "none":
            if strength in ("hflip", "vflip"):
                return image.flip(-1 if strength == "hflip" else -2)
            angle = math.radians(float(strength.removeprefix("rot")))
            rotate = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
            image = warp_affine(image, _about_centre(rotate, h, w), (h, w))
        return image
    return apply


@dataclass
class FloatPixels:
    """Where a split's float pixels come from, for perturbations in flux."""
    origin: str  # "source FITS" or "npy members"
    arcsec_per_px: float  # of those pixels
    read: Callable[[int], np.ndarray]  # row of the split refs -> (bands, H, W) float32 fluxes


def float_pixels(manifest: dict, info, refs: np.ndarray, labels, probe_row: int,
                 shard_arcsec_per_px: float) -> tuple[FloatPixels | None, str]:
    """The float pixels of the samples (source FITS if the build's images are still there, else .npy members),
    or None; and a sentence saying which and why."""
    build = manifest["build"]
    images_dir = Path(build["images"])
    has_loc = "file_loc" in labels.columns

    def read_fits(row: int) -> np.ndarray:
        label = labels.loc[info.key(int(refs[row][1]), int(refs[row][2]))]
        paths = images.locate_images(images_dir, build["image_pattern"], str(label["object_id"]),
                                     build["survey"]["bands"], label["file_loc"] if has_loc else None)
        data, is_8bit = images.read_stack(paths)
        if is_8bit:
            raise images.ImageError("not-flux", f"{paths[0]}: an 8-bit picture, not flux")
        return data

    reason = f"the build's images ({images_dir}) are not there"
    if images_dir.is_dir():
        try:
            read_fits(probe_row)
            return FloatPixels("source FITS", manifest["survey_meta"]["pixel_scale_arcsec"], read_fits), \
                f"noise and PSF act in flux before the stretch, on the source FITS under {images_dir}"
        except (images.ImageError, KeyError) as err:
            reason = f"the source images are not flux FITS ({err})"
    if "npy" in manifest.get("members", []):
        reader = SampleReader([info])

        def read_npy(row: int) -> np.ndarray:
            raw = reader.read(0, int(refs[row][1]), int(refs[row][2]), "npy")
            return np.load(io.BytesIO(raw), allow_pickle=False).astype(np.float32)

        return FloatPixels("npy members", shard_arcsec_per_px, read_npy), \
            f"noise and PSF act in flux before the stretch, on the shards' float16 .npy members ({reason})"
    return None, (f"only 8-bit images: {reason} and the shards have no .npy members (build with --keep-float), so "
                  "every perturbation acts on the 8-bit rendering")


def flux_perturbation(kind: str, strength, pixels: FloatPixels, image_size: int, seed: int):
    """(image, row) -> the row's float pixels perturbed in flux (sharding.flux), rendered as the build renders them.

    psf: a Gaussian of FWHM `strength` arcsec convolved in; noise: per band, Gaussian noise of sigma (peak - median)
    / strength per float pixel. The decoded 8-bit image is not used.
    """
    def apply(image: torch.Tensor, row: int) -> torch.Tensor:
        data, _ = images.clean_pixels(pixels.read(row))  # as the build does first: no NaN reaches the convolution
        if kind == "psf" and strength > 0:
            data = flux.convolve_kernel(data, flux.psf_image(flux.PSF(float(strength)), pixels.arcsec_per_px))
        elif kind == "noise" and strength > 0:
            sigma = [(float(band.max()) - float(np.median(band))) / strength for band in data]
            data, _ = flux.add_noise_to_depth(data, sigma, 0.0, np.random.default_rng(seed * 1_000_003 + row))
        return torch.from_numpy(render.render_float(data, image_size).astype(np.float32))
    return apply


def predict_all(model, cfg: LoaderConfig, info, refs: np.ndarray, rows: np.ndarray, batch_size: int,
                rejects: reading.Rejects, perturb=None, mc_samples: int = 0,
                seed: int = 0) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray | None]:
    """(keys, rows in the split, fractions (n, F), raw logits of each MC pass (S, n, F + K) or None) of the
    readable samples among `refs`."""
    keys, kept, fractions_, samples = [], [], [], []
    for batch in reading.iter_batches(cfg, info, refs, rows, batch_size=batch_size, rejects=rejects, perturb=perturb):
        out = infer(model, batch.images, mc_samples, keep_samples=bool(mc_samples),
                    row_seeds=[seed + int(row) for row in batch.rows])  # the same draws for a galaxy in every setting
        keys += batch.keys
        kept.append(batch.rows)
        fractions_.append(out.fractions)
        samples.append(out.samples)
    if not keys:
        raise ValueError(f"{info.directory}: no readable sample among the first {len(refs)} of the split")
    return (keys, np.concatenate(kept), np.concatenate(fractions_),
            np.concatenate(samples, axis=1) if mc_samples else None)


def calibration(model, loss: str | None, samples: np.ndarray, rows, names: list[str],
                questions: dict[str, list[str]]) -> dict:
    """Coverage of central predictive intervals for the votes each galaxy's answers got, against nominal.

    The predictive of an answer's votes k out of the question's N mixes, over the MC passes, Binomial(N, p) for a
    model trained on fractions (MSE) or BetaBinomial(N, alpha_j, A - alpha_j), the Dirichlet-multinomial marginal,
    for a Dirichlet model: the model's spread plus the galaxy's own vote noise, so a model equal to the truth
    covers at the nominal rate. Galaxies whose question got no vote count are left out.
    """
    raw = torch.from_numpy(samples)
    columns = [model.layout.names.index(n) for n in names]
    question_of = {f: q for q, fs in questions.items() for f in fs}
    k = np.column_stack([rows[votes_column(n)].to_numpy(np.float64) if votes_column(n) in rows.columns
                         else np.full(len(rows), np.nan) for n in names])
    total = np.column_stack([rows[total_votes_column(question_of[n])].to_numpy(np.float64)
                             if n in question_of and total_votes_column(question_of[n]) in rows.columns
                             else np.full(len(rows), np.nan) for n in names])
    ok = np.isfinite(k) & np.isfinite(total) & (total >= 1)
    k, total = np.where(ok, k, 0.0), np.where(ok, total, 1.0)
    if loss == "dirichlet":
        alpha = concentrations(raw, model.layout).double()
        layout = model.layout
        per_question = (alpha[..., :layout.num_features] @ layout.feature_question.double()
                        + alpha[..., layout.num_features:] @ layout.other_question.double())
        alpha_total = (per_question @ layout.feature_question.double().T).numpy()[..., columns]
        below, at = m.beta_binomial_mixture_cdf(k, total, alpha.numpy()[..., columns], alpha_total)
        predictive = "Dirichlet-multinomial (BetaBinomial(N, alpha_j, A - alpha_j)), mixed over MC passes"
    else:
        p = fractions(raw, model.layout).double().numpy()[..., columns]
        below, at = m.binomial_mixture_cdf(k, total, p)
        predictive = "Binomial(N, p) mixed over MC passes (the model was trained on fractions)" if loss == "mse" \
            else "Binomial(N, p) mixed over MC passes (the model's training loss is not recorded)"
    curve = m.predictive_coverage(np.where(ok, below, np.nan), np.where(ok, at, np.nan))
    return {"predictive": predictive, "num_answers": int(ok.sum()), "curve": curve}


def rendered_scale(manifest: dict, survey: str, native_pixels: int | None,
                   shard_root: str | Path | None = None) -> float:
    """Arcsec per shard pixel: the survey's pixel scale times the native/rendered width ratio."""
    native = native_pixels or load_survey(survey, shard_root=shard_root).mock.cutout_px
    return manifest["survey_meta"]["pixel_scale_arcsec"] * native / manifest["build"]["image_size"]


def run(args: argparse.Namespace, log=tqdm.write, progress: bool = True) -> dict:
    source = sources.open_source(args.model)
    spec = source.input_spec()
    device = resolve_device(args.device)
    model = sources.load_model(source, device)
    check_mc(model, args.mc_samples)
    manifest = sources.check_shards(source, Path(args.shards) / args.survey, spec)
    scale = rendered_scale(manifest, args.survey, args.native_pixels, args.shards)
    cfg = LoaderConfig(shard_root=args.shards, backend="torch", image_size=spec.image_size, mean=spec.mean,
                       std=spec.std)
    labels = read_labels(Path(args.shards), args.survey)
    names = [n for n in source.names if n in labels.frame.columns]
    info = load_survey_shards(Path(args.shards) / args.survey, args.split)
    rejects = reading.Rejects(info, args.split, args.max_error_rate)
    refs = reading.split_refs(info, args.max_galaxies)
    keys, readable, clean, samples = predict_all(model, cfg, info, refs, np.arange(len(refs)), args.batch_size,
                                                 rejects, mc_samples=args.mc_samples, seed=args.seed)
    rows = labels.frame.loc[keys]
    target = rows[names].to_numpy(np.float64)
    mask = label_mask(rows, names, labels.questions)
    columns = [source.names.index(n) for n in names]
    result = {"survey": args.survey, "split": args.split, "n": len(keys), "model": source.record(),
              "arcsec_per_px": scale, "shards": args.shards, "kinds": {}, "calibration": None,
              "rejects": rejects.take()}
    if samples is not None:
        result["calibration"] = calibration(model, source.record()["loss"], samples, rows, names, labels.questions)
    if args.space == "8bit":
        pixels, note = None, "--space 8bit: every perturbation acts on the 8-bit rendering"
    elif not set(SETTINGS) & set(FLUX_KINDS):
        pixels, note = None, "no perturbation here acts in flux; all act on the 8-bit rendering"
    else:
        pixels, note = float_pixels(manifest, info, refs, labels.frame, int(readable[0]), scale)
    baselines = {"8-bit": clean}
    if pixels is not None:
        try:  # the unperturbed float rendering: the baseline of the flux-space kinds' shifts
            seen, _, baselines["flux"], _ = predict_all(
                model, cfg, info, refs[readable], readable, args.batch_size, reading.Rejects(info, args.split, 1.0),
                flux_perturbation("none", 0, pixels, manifest["build"]["image_size"], args.seed))
            if seen != keys:
                raise ValueError(f"{len(keys) - len(seen)} samples have no readable float pixels")
        except ValueError as err:
            pixels, note = None, f"only 8-bit images: the {pixels.origin} could not be read for every sample ({err})"
    space = {kind: "flux" if pixels is not None and kind in FLUX_KINDS else "8-bit" for kind in SETTINGS}
    result["pixels"] = {"space": space, "float_input": pixels and pixels.origin,
                        "arcsec_per_float_px": pixels and pixels.arcsec_per_px, "note": note}
    log(f"  pixels: {note}")
    bar = tqdm(total=sum(map(len, SETTINGS.values())), unit="setting", desc="robustness", disable=not progress,
               dynamic_ncols=True)
    for kind, strengths in SETTINGS.items():
        points = []
        clean = baselines[space[kind]]
        for strength in strengths:
            bar.update(1)
            pred = clean if strength == IDENTITY.get(kind) else perturbed_predictions(
                model, cfg, info, refs, readable, keys, args, flux_perturbation(
                    kind, strength, pixels, manifest["build"]["image_size"], args.seed)
                if space[kind] == "flux" else perturbation(kind, strength, scale, args.seed))
            table = m.feature_table(pred[:, columns], target, mask, names, num_resamples=args.bootstrap,
                                    seed=args.seed, metrics=("r", "mae"))
            shift = float(np.mean(np.abs(pred - clean)))
            points.append({"strength": strength, **{k: table["mean"][k] for k in ("r", "r_ci", "mae", "mae_ci")},
                           "shift": shift})
            log(f"  {kind:<10} {str(strength):>6}: r {cell(points[-1]['r'], points[-1]['r_ci'])}, "
                f"MAE {cell(points[-1]['mae'])}, mean |shift| {shift:.4f}")
        result["kinds"][kind] = points
    bar.close()
    return result


def perturbed_predictions(model, cfg: LoaderConfig, info, refs: np.ndarray, readable: np.ndarray, keys: list[str],
                          args: argparse.Namespace, perturb) -> np.ndarray:
    """Fractions of the readable samples under one perturbation (the unperturbed ones are the baseline's)."""
    seen, _, pred, _ = predict_all(model, cfg, info, refs[readable], readable, args.batch_size,
                                   reading.Rejects(info, args.split, 1.0), perturb)
    if seen != keys:
        raise ValueError(f"{info.directory}: samples readable at first became unreadable during the study")
    return pred


def write_plots(result: dict, out: Path) -> dict[str, str]:
    from eval import plots

    out.mkdir(parents=True, exist_ok=True)
    paths = {"curves": out / "robustness.png"}
    paths["curves"].write_bytes(plots.robustness_curves(result["kinds"]))
    if result["calibration"]:
        paths["calibration"] = out / "calibration.png"
        paths["calibration"].write_bytes(plots.calibration({result["survey"]: result["calibration"]["curve"]}))
    reading.write_rejects(result["rejects"], out / "rejects.parquet")
    paths["rejects"] = out / "rejects.parquet"
    return {k: str(v) for k, v in paths.items()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        print(sources.describe(sources.open_source(args.model)), flush=True)
        result = run(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result["plots"] = write_plots(result, Path(args.out))
    write_json(result, str(Path(args.out) / "robustness.json"))
    if result["calibration"]:
        print("predictive-interval coverage (MC spread + vote noise): " + ", ".join(
            f"{p['nominal']:.2f} -> {p['coverage']:.2f}" for p in result["calibration"]["curve"]))
    if result["rejects"]:
        print(f"{len(result['rejects'])} unreadable samples skipped (listed in {result['plots']['rejects']})")
    print(f"wrote {Path(args.out) / 'robustness.json'} and {', '.join(result['plots'].values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
