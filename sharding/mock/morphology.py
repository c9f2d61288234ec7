"""The true morphology of a mock galaxy: its parameters, how they are drawn, and their answer categories."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from sharding.registry import MockSpec

KINDS = ("smooth", "featured", "artifact")
KIND_PROBABILITIES = (0.40, 0.55, 0.05)
ARTIFACTS = ("star", "satellite_trail", "hot_pixels")
DISTURBANCES = ("none", "minor", "major", "merger")
DISTURBANCE_PROBABILITIES = (0.84, 0.08, 0.05, 0.03)
ARM_COUNTS = (1, 2, 3, 4, 5, 6)
ARM_COUNT_PROBABILITIES = (0.06, 0.48, 0.2, 0.1, 0.1, 0.06)
EDGE_ON_DEG = 75.0  # inclination above which a disk reads as edge-on
DISK_THICKNESS = 0.12  # intrinsic minor/major axis ratio of a disk seen exactly edge-on
STRONG_BAR = 0.55  # bar strength above which a bar counts as strong


@dataclass(frozen=True)
class Morphology:
    """Everything that decides how a galaxy looks; angles in degrees, sizes in arcsec, fluxes in bunit."""
    kind: str  # smooth | featured | artifact
    r_eff_arcsec: float  # half-light radius of the whole galaxy (the disk's for disks)
    flux: float  # total flux, mean over bands
    sersic_n: float  # bulge (or spheroid) Sersic index
    bulge_to_total: float
    bulge_r_frac: float  # bulge half-light radius / r_eff
    bulge_axis_ratio: float
    axis_ratio: float  # projected minor/major axis ratio of the main body
    inclination_deg: float  # 0 = face-on; meaningful for disks
    position_angle_deg: float  # major axis, counter-clockwise from the image +x axis
    edge_on: bool
    edge_on_bulge: str  # rounded | boxy | none ("" unless edge-on)
    dust_lane: bool
    bar_strength: float  # 0 = no bar
    bar_angle_deg: float  # in the disk plane, relative to the major axis
    arm_count: int  # 0 = no spiral arms; 6 stands for "more than 4" beyond 5
    pitch_angle_deg: float  # spiral pitch: small = tightly wound
    arm_strength: float  # fraction of disk light modulated into arms
    clumpy: bool
    clump_symmetric: bool
    disturbance: str  # none | minor | major | merger
    artifact: str  # star | satellite_trail | hot_pixels ("" for galaxies)
    colour: float  # bulge reddening jitter, multiplies the bulge SED slope

    @property
    def is_disk(self) -> bool:
        return self.kind == "featured"

    @property
    def has_bar(self) -> bool:
        return self.bar_strength > 0

    @property
    def has_spiral(self) -> bool:
        return self.arm_count > 0


def log_uniform(u: float, bounds: tuple[float, float]) -> float:
    lo, hi = bounds
    if lo <= 0 or hi < lo:
        raise ValueError(f"log-uniform range must be 0 < low <= high, got {bounds}")
    return float(lo * (hi / lo) ** u)


def draw_morphology(rng: np.random.Generator, spec: MockSpec) -> Morphology:
    """One galaxy. Every draw happens whatever the survey, so a seed gives the same population in each survey;
    only r_eff and flux are mapped through the survey's ranges (same quantiles, survey units)."""
    u = rng.random(24)  # fixed-size block of uniforms: the stream never depends on the branches below
    kind = _pick(KINDS, KIND_PROBABILITIES, u[0])
    size_q = u[1]
    # Bigger galaxies are brighter: flux quantile follows size quantile with scatter.
    flux_q = float(np.clip(0.6 * size_q + 0.4 * u[2] + 0.1 * (u[3] - 0.5), 0.0, 1.0))
    common = dict(kind=kind, r_eff_arcsec=log_uniform(size_q, spec.r_eff_arcsec),
                  flux=log_uniform(flux_q, spec.flux_range), position_angle_deg=180.0 * u[4],
                  colour=0.7 + 0.6 * u[5], disturbance=_pick(DISTURBANCES, DISTURBANCE_PROBABILITIES, u[6]))
    if kind == "featured":
        return _disk(u, common)
    if kind == "smooth":
        return _spheroid(u, common)
    return _artifact(u, common)


def _pick(options: tuple, probabilities: tuple[float, ...], u: float):
    cumulative = np.cumsum(probabilities) / sum(probabilities)
    return options[min(int(np.searchsorted(cumulative, u, side="right")), len(options) - 1)]


def _blank(common: dict) -> dict:
    return dict(common, sersic_n=4.0, bulge_to_total=1.0, bulge_r_frac=1.0, bulge_axis_ratio=1.0,
                axis_ratio=1.0, inclination_deg=0.0, edge_on=False, edge_on_bulge="", dust_lane=False,
                bar_strength=0.0, bar_angle_deg=0.0, arm_count=0, pitch_angle_deg=0.0, arm_strength=0.0,
                clumpy=False, clump_symmetric=False, artifact="")


def _spheroid(u: np.ndarray, common: dict) -> Morphology:
    # Ellipticals: mostly round-ish, a tail of flattened ones (E0-E7 spans axis ratios 1.0-0.3).
    q = 1.0 - 0.7 * u[7] ** 1.4
    fields = _blank(common)
    fields.update(sersic_n=2.5 + 2.5 * u[8], axis_ratio=q, bulge_axis_ratio=q)
    return Morphology(**fields)


def _disk(u: np.ndarray, common: dict) -> Morphology:
    cos_i = u[9]  # isotropic orientations: cos(inclination) uniform
    inclination = math.degrees(math.acos(cos_i))
    edge_on = inclination > EDGE_ON_DEG
    axis_ratio = math.sqrt(cos_i ** 2 * (1 - DISK_THICKNESS ** 2) + DISK_THICKNESS ** 2)
    bulge_to_total = 0.7 * u[10] ** 1.6  # many small bulges, few dominant ones
    if bulge_to_total < 0.04:
        bulge_to_total = 0.0
    fields = _blank(common)
    fields.update(sersic_n=2.5 + 2.5 * u[8], bulge_to_total=bulge_to_total, bulge_r_frac=0.15 + 0.3 * u[11],
                  bulge_axis_ratio=0.75 + 0.25 * u[12], axis_ratio=axis_ratio, inclination_deg=inclination,
                  edge_on=edge_on)
    if edge_on:
        shape = "none" if bulge_to_total == 0 else ("boxy" if u[13] < 0.3 else "rounded")
        fields.update(edge_on_bulge=shape, dust_lane=bool(u[14] < 0.5))
        return Morphology(**fields)
    # Bars and arms are drawn for every non-edge-on disk; they are hard to see near edge-on but present.
    if u[15] < 0.4:
        fields.update(bar_strength=0.2 + 0.8 * u[16], bar_angle_deg=180.0 * u[17])
    if u[18] < 0.8 - 0.5 * bulge_to_total:
        fields.update(arm_count=_pick(ARM_COUNTS, ARM_COUNT_PROBABILITIES, u[19]),
                      pitch_angle_deg=6.0 + 34.0 * u[20], arm_strength=0.3 + 0.5 * u[21])
    fields.update(clumpy=bool(u[22] < 0.15), clump_symmetric=bool(u[23] < 0.5))
    return Morphology(**fields)


def _artifact(u: np.ndarray, common: dict) -> Morphology:
    fields = _blank(common)
    # A faint, compact smooth source sits behind the artifact, as in real "star or artifact" cutouts.
    fields.update(artifact=_pick(ARTIFACTS, (0.5, 0.25, 0.25), u[7]), sersic_n=2.0 + 2.0 * u[8],
                  axis_ratio=0.6 + 0.4 * u[12], bulge_axis_ratio=0.6 + 0.4 * u[12], disturbance="none")
    return Morphology(**fields)


def bulge_size(m: Morphology) -> str:
    """The 4-option GZ2/GZH/UKIDSS bulge category of the true bulge-to-total ratio."""
    bt = m.bulge_to_total
    return "none" if bt < 0.04 else "just-noticeable" if bt < 0.15 else "obvious" if bt < 0.4 else "dominant"


def roundness(axis_ratio: float) -> str:
    return "round" if axis_ratio > 0.8 else "in-between" if axis_ratio > 0.45 else "cigar-shaped"


def winding(pitch_angle_deg: float) -> str:
    return "tight" if pitch_angle_deg < 15 else "medium" if pitch_angle_deg < 25 else "loose"


def bar_class(m: Morphology) -> str:
    return "no" if not m.has_bar else "strong" if m.bar_strength >= STRONG_BAR else "weak"


def truth_record(m: Morphology) -> dict:
    """Flat truth-table row: the parameters plus the categories volunteers are asked about."""
    record = asdict(m)
    record.update(has_bar=m.has_bar, bar_class=bar_class(m), has_spiral=m.has_spiral, bulge_size=bulge_size(m),
                  roundness=roundness(m.axis_ratio) if m.kind == "smooth" else "",
                  winding=winding(m.pitch_angle_deg) if m.has_spiral else "")
    return record
