"""The survey registry: one YAML per survey in configs/surveys/ describes its facts and catalog columns."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from sharding.config import CONFIG_ROOT, config_file, config_names, from_dict, merge, parse_overrides, read_yaml
from sharding.schema import FeatureSchema, load_schema

SURVEY_DIR = CONFIG_ROOT / "surveys"
SHARD_SURVEY_FILE = "survey.yaml"  # the resolved survey YAML a build writes beside its shards


@dataclass(frozen=True)
class SkyRegion:
    """One box of a mock footprint: ra as (low, high) in [0, 360], wrapping through 0 when low > high
    (e.g. [310, 60] is Stripe 82's RA span); dec as (low, high) in [-90, 90]."""
    ra: tuple[float, float] = (0.0, 360.0)
    dec: tuple[float, float] = (-10.0, 10.0)
    name: str = ""


@dataclass(frozen=True)
class MockSpec:
    """How `sharding.mock` renders this survey (ignored for real data)."""
    cutout_px: int = 96
    r_eff_arcsec: tuple[float, float] = (1.5, 6.0)  # log-uniform range of galaxy half-light radii
    sky_noise: float = 0.01  # per-pixel Gaussian sky noise, in the survey's bunit
    flux_range: tuple[float, float] = (20.0, 400.0)  # total galaxy flux per band, log-uniform, bunit
    volunteers_mean: float = 40.0  # mean number of classifications per galaxy
    catalog_format: str = "csv"  # csv | parquet | fits; only used when the catalog path's extension says none
    write_file_loc: bool = False  # write a file_loc column instead of relying on image_pattern
    gain: float = 1000.0  # detected counts per bunit: source Poisson variance = flux / gain (deeper = larger)
    saturation: float = 1.0e4  # pixel value where the detector saturates, bunit
    psf_profile: Literal["gaussian", "moffat"] = "gaussian"
    moffat_beta: float = 3.5  # Moffat PSF wing index (ground-based seeing ~2.5-4.5)
    oversample: int = 2  # sub-pixels per pixel side when evaluating profiles, block-summed afterwards
    bulge_sed: list[float] = field(default_factory=list)  # per-band bulge flux / mean; empty = red ramp
    disk_sed: list[float] = field(default_factory=list)  # per-band disk flux / mean; empty = flat-blue ramp
    # Where on the one mock sky this survey looks; a galaxy inside several surveys' footprints is in each of them.
    footprint: list[SkyRegion] = field(default_factory=lambda: [SkyRegion()])
    id_style: Literal["number", "iauname"] = "number"  # iauname: Jhhmmss.ss+ddmmss.s from ra/dec
    id_start: int = 1  # number ids: id_start + index * id_stride + a random offset below id_stride
    id_stride: int = 1
    id_prefix: str = ""  # non-empty: ids are strings "<prefix><number>"
    native_columns: Literal["ortho", "strip-campaign", "hart16", "willett17"] = "ortho"  # catalog naming


@dataclass(frozen=True)
class SurveyConfig:
    name: str
    campaign: str
    pixel_scale_arcsec: float
    psf_fwhm_arcsec: float
    bands: list[str]
    id_column: str
    ra_column: str
    dec_column: str
    catalog: str
    images: str
    features: dict[str, list[str]]
    question_totals: dict[str, list[str]]
    catalog_reference: str = ""
    bunit: str = "adu"
    image_pattern: str = "{id}.fits"
    count_suffix: str = "_count"
    fraction_suffix: str = "_fraction"
    image_size: int = 256
    samples_per_shard: int = 1000
    mock: MockSpec = field(default_factory=MockSpec)

    def count_columns(self, feature: str) -> list[str]:
        return [base + self.count_suffix for base in self.features.get(feature, [])]

    def fraction_columns(self, feature: str) -> list[str]:
        return [base + self.fraction_suffix for base in self.features.get(feature, [])]

    @property
    def psf_fwhm_px(self) -> float:
        return self.psf_fwhm_arcsec / self.pixel_scale_arcsec


def validate_survey(survey: SurveyConfig, schema: FeatureSchema, source: str) -> None:
    """Check a survey's mapping against the feature schema; features it omits are absent (NaN)."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", survey.name):
        raise ValueError(f"{source}: survey name {survey.name!r} must be a plain identifier (lower-case letters, "
                         "digits, '_' and '-'): it names folders, shard files and sample keys")
    unknown = sorted(set(survey.features) - set(schema.names))
    if unknown:
        raise ValueError(f"{source}: features {unknown} are not in the {schema.name} schema "
                         f"(valid names: {schema.names})")
    unknown_q = sorted(set(survey.question_totals) - set(schema.question_names))
    if unknown_q:
        raise ValueError(f"{source}: question_totals {unknown_q} are not questions of the {schema.name} "
                         f"schema (valid: {schema.question_names})")
    for feature, bases in survey.features.items():
        if not bases:
            raise ValueError(f"{source}: feature {feature!r} maps to no columns; remove it to mark it absent")
        question = schema.question_of(feature)
        if question not in survey.question_totals:
            raise ValueError(f"{source}: feature {feature!r} is mapped but question_totals has no entry "
                             f"for its question {question!r}")
    if survey.pixel_scale_arcsec <= 0 or survey.psf_fwhm_arcsec <= 0:
        raise ValueError(f"{source}: pixel_scale_arcsec and psf_fwhm_arcsec must be positive")
    if not survey.bands:
        raise ValueError(f"{source}: bands must list at least one band")


def survey_path(name_or_path: str | Path, shard_root: str | Path | None = None) -> Path:
    """A survey name (`hst`) resolves to configs/surveys/hst.yaml (./configs/ first), then, with a shard root, to
    the copy a build left beside the shards (<shard_root>/<name>/survey.yaml: derived surveys live only there);
    a path is taken as is."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml"):
        return candidate
    path = config_file("surveys", str(name_or_path))
    if path.is_file():
        return path
    beside = Path(shard_root) / str(name_or_path) / SHARD_SURVEY_FILE if shard_root is not None else None
    if beside is not None and beside.is_file():
        return beside
    raise ValueError(f"unknown survey {str(name_or_path)!r}: no {path}{f' and no {beside}' if beside else ''}. "
                     f"Known surveys: {list_surveys()}. Add a survey by adding one YAML there (or pass a YAML path).")


def load_survey(name_or_path: str | Path, overrides: list[str] | None = None,
                schema: FeatureSchema | None = None, shard_root: str | Path | None = None) -> SurveyConfig:
    """Load and validate one survey's YAML (see survey_path for names), with optional dotted overrides."""
    path = survey_path(name_or_path, shard_root)
    data = merge(read_yaml(path), parse_overrides(overrides))
    survey = from_dict(SurveyConfig, data, where=str(path))
    validate_survey(survey, schema or load_schema(), str(path))
    return survey


def list_surveys() -> list[str]:
    return config_names("surveys")
