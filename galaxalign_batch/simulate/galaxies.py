"""Galaxies of the 10 Galaxy10 DECaLS classes, and stars, drawn with galsim profiles and a Moffat PSF.

Each class has a recipe that builds a :class:`~galaxalign_batch.simulate.render.Model` with the
structure that defines the class (see docs/simulate.md for the parameter ranges). Sizes are in
arcsec, fluxes in nanomaggies; ``rng`` is a ``numpy.random.Generator`` and the only source of
randomness, so a source is reproducible from its seed.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from galaxalign_batch.errors import ConfigError
from galaxalign_batch.simulate import fields
from galaxalign_batch.simulate.observing import Conditions, check_bands, flux_to_mag, mag_to_flux, psf_kernel
from galaxalign_batch.simulate.render import OVERSAMPLE, Model, bin_pixels, render, rotation, squash
from galaxalign_batch.survey.layout import BANDS, PIXSCALE

GENERATOR_VERSION = "2"            # bump when the recipes change what a seed produces (2: realistic sky, issue 13)
MAG_RANGE = (15.5, 19.0)           # r-band AB magnitudes of the galaxies
STAR_MAG_RANGE = (12.0, 22.0)      # r-band AB magnitudes of the stars
STAR_COUNT_SLOPE = 0.15            # dN/dm ~ 10**(slope * m)
MIN_STAMP, MAX_STAMP = 48, 256
TRUNC = 8.0                        # Sersic profiles (n > 1) end at 8 half-light radii
# apparent size ~ 10**(SIZE_SLOPE (r - 17)): -0.2 would keep the surface brightness constant; -0.15
# lets fainter (more distant) galaxies be ~0.5 mag arcsec^-2 dimmer over 15.5-19, as cosmological
# dimming does: the median disc's central surface brightness goes from 20.2 (r = 15.5) to 21.0 mag
# arcsec^-2 (r = 19), at the edge of the SDSS discs' <mu_0,r> = 20.2 +- 0.7 (Fathi 2010); see
# docs/simulate.md and bench/sky_realism.py
SIZE_SLOPE = -0.15
DISK_R_HALF = (2.6, 4.2)           # arcsec at r = 17: exponential discs of spirals and edge-ons

# (g-r, r-z) of each colour group; each galaxy jitters them by +-0.06
COLOURS = {
    "bulge": (0.85, 0.47),   # old, red
    "bar": (0.78, 0.43),
    "disk": (0.60, 0.36),
    "arms": (0.42, 0.24),
    "knots": (0.15, 0.05),   # star-forming clumps, blue
    "tail": (0.50, 0.30),
}


@lru_cache(maxsize=1)
def _class_keys() -> tuple[str, ...]:
    from galaxalign_batch.vocabulary import load_vocabulary

    return tuple(load_vocabulary("galaxy10").keys)


def class_keys() -> list[str]:
    """The Galaxy10 class keys in label order (``galaxalign_batch/data/galaxy10.toml``)."""
    return list(_class_keys())


def _sersic(n: float, r_half: float):
    """Unit-flux Sersic profile truncated at TRUNC half-light radii (as the Tractor's galaxy models
    are); ``n`` is snapped to a 0.5 grid so galsim's per-n tables are reused."""
    import galsim

    n = float(np.clip(np.round(n * 2) / 2, 0.5, 6.0))
    if n <= 1.0:   # exponential and flatter profiles hold < 0.1 % of their light beyond 8 r_half
        if n == 1.0:
            return galsim.Exponential(half_light_radius=r_half)
        return galsim.Sersic(n=n, half_light_radius=r_half)
    if n == 4.0:
        return galsim.DeVaucouleurs(half_light_radius=r_half, trunc=TRUNC * r_half)
    return galsim.Sersic(n=n, half_light_radius=r_half, trunc=TRUNC * r_half)


def _colours(rng: np.random.Generator, groups) -> dict[str, tuple[float, float]]:
    return {g: (COLOURS[g][0] + rng.uniform(-0.06, 0.06), COLOURS[g][1] + rng.uniform(-0.06, 0.06)) for g in groups}


def _tractor_shape(q: float, beta: float) -> tuple[float, float, float]:
    """(pa_deg east of north, e1, e2) of an ellipse with axis ratio q whose major axis makes angle
    ``beta`` (radians, counter-clockwise) with +x; north is +y and east is -x in brick images."""
    pa = (np.degrees(beta) - 90.0) % 180.0
    e = (1.0 - q) / (1.0 + q)
    return float(pa), float(e * np.cos(2 * np.radians(pa))), float(e * np.sin(2 * np.radians(pa)))


# --- class recipes: each returns (model, params) with params holding the truth of the main body ---

def _smooth(rng, flux, scale, n_choices, r_range, q_range):
    n = float(rng.choice(n_choices))
    r_half = rng.uniform(*r_range) * scale
    q = rng.uniform(*q_range)
    beta = rng.uniform(0, np.pi)
    m = Model(colours=_colours(rng, ["bulge"]))
    m.add_system(rotation(beta) @ squash(q))
    m.add("bulge", flux, _sersic(n, r_half))
    # Sersic wings reach further for larger n: up to the truncation along the major axis
    return m, dict(r_half=r_half, sersic_n=n, q=q, beta=beta, extent=min(2.5 + 1.5 * n, TRUNC) * r_half / np.sqrt(q))


def _round_smooth(rng, flux, scale):
    return _smooth(rng, flux, scale, [3.5, 4.0, 4.0, 4.5, 5.0], (1.6, 3.2), (0.85, 1.0))


def _in_between_round_smooth(rng, flux, scale):
    return _smooth(rng, flux, scale, [2.0, 2.5, 3.0, 3.5, 4.0], (1.8, 3.5), (0.5, 0.7))


def _cigar_smooth(rng, flux, scale):
    return _smooth(rng, flux, scale, [1.5, 2.0, 2.5, 3.0], (2.5, 4.5), (0.2, 0.35))


def _spiral(rng, flux, scale, *, barred: bool, pitch, n_arms_choices, bulge_frac, bulge_rel, bulge_n,
            sharpness, arm_frac, knots, knot_frac, knot_sigma, r_start_rel):
    r_disk = rng.uniform(*DISK_R_HALF) * scale
    h = r_disk / 1.678
    q = rng.uniform(0.6, 1.0)
    beta = rng.uniform(0, np.pi)
    phase = rng.uniform(0, 2 * np.pi)
    chirality = int(rng.choice([-1, 1]))
    pitch_deg = rng.uniform(*pitch)
    n_arms = int(rng.choice(n_arms_choices))
    fb = rng.uniform(*bulge_frac)
    r_bulge = max(rng.uniform(*bulge_rel) * r_disk, 0.5)
    n_bulge = float(rng.choice(bulge_n))
    groups = ["bulge", "disk", "arms", "knots"] + (["bar"] if barred else [])
    m = Model(colours=_colours(rng, groups))
    disk_sys = m.add_system(rotation(beta) @ squash(q))
    bulge_sys = m.add_system(rotation(beta) @ squash(min(1.0, q + 0.2)))
    params = dict(r_half=r_disk, sersic_n=1.0, q=q, beta=beta, pitch_deg=pitch_deg, n_arms=n_arms,
                  bulge_frac=fb, chirality=chirality, extent=3.6 * r_disk)
    fbar = 0.0
    if barred:
        fbar = rng.uniform(0.12, 0.22)
        a_bar = rng.uniform(0.6, 0.9) * r_disk
        q_bar = rng.uniform(0.22, 0.32)
        bar = _sersic(0.5, a_bar * np.sqrt(q_bar) / 1.7).transform(*(rotation(phase) @ squash(q_bar)).ravel())
        m.add("bar", flux * fbar, bar, disk_sys)
        r_start = a_bar
        params.update(bar_frac=fbar, bar_length=a_bar, bar_q=q_bar)
    else:
        r_start = max(rng.uniform(*r_start_rel) * r_disk, 1.5 * r_bulge)
    m.add("bulge", flux * fb, _sersic(n_bulge, r_bulge), bulge_sys)
    disk_flux = flux * (1.0 - fb - fbar)
    fa, fk = rng.uniform(*arm_frac), rng.uniform(*knot_frac)
    spiral = dict(n_arms=n_arms, pitch_deg=pitch_deg, r_start=r_start, phase=phase, chirality=chirality)
    m.add("disk", disk_flux * (1 - fa - fk), _sersic(1.0, r_disk), disk_sys)
    m.add("arms", disk_flux * fa, fields.spiral_arms(scale_length=h, sharpness=rng.uniform(*sharpness), **spiral),
          disk_sys)
    nk = int(rng.integers(*knots))
    pts = fields.arm_points(rng, nk, r_max=3.0 * h, **spiral)
    m.add("knots", disk_flux * fk,
          fields.blobs(pts, rng.lognormal(0.0, 0.5, nk), rng.uniform(*knot_sigma, nk)), disk_sys)
    params.update(r_start=r_start, arm_frac=fa)
    return m, params


def _barred_spiral(rng, flux, scale):
    return _spiral(rng, flux, scale, barred=True, pitch=(14, 24), n_arms_choices=[2], bulge_frac=(0.06, 0.15),
                   bulge_rel=(0.10, 0.16), bulge_n=[1.5, 2.0, 2.5], sharpness=(3, 5), arm_frac=(0.20, 0.32),
                   knots=(10, 21), knot_frac=(0.02, 0.05), knot_sigma=(0.25, 0.4), r_start_rel=None)


def _unbarred_tight_spiral(rng, flux, scale):
    return _spiral(rng, flux, scale, barred=False, pitch=(8, 13), n_arms_choices=[2, 2, 2, 3],
                   bulge_frac=(0.15, 0.32), bulge_rel=(0.15, 0.25), bulge_n=[2.0, 2.5, 3.0], sharpness=(4, 7),
                   arm_frac=(0.18, 0.30), knots=(10, 21), knot_frac=(0.02, 0.05), knot_sigma=(0.25, 0.4),
                   r_start_rel=(0.2, 0.3))


def _unbarred_loose_spiral(rng, flux, scale):
    return _spiral(rng, flux, scale, barred=False, pitch=(26, 40), n_arms_choices=[2, 2, 3],
                   bulge_frac=(0.02, 0.10), bulge_rel=(0.12, 0.2), bulge_n=[1.5, 2.0], sharpness=(2, 3.5),
                   arm_frac=(0.22, 0.35), knots=(20, 36), knot_frac=(0.04, 0.08), knot_sigma=(0.3, 0.5),
                   r_start_rel=(0.2, 0.35))


def _edge_on(rng, flux, scale, *, bulge: bool):
    import galsim

    r_disk = rng.uniform(*DISK_R_HALF) * scale
    h = r_disk / 1.678
    hz = h * rng.uniform(0.10, 0.16)     # the thin disc
    incl = rng.uniform(82.0, 90.0)
    beta = rng.uniform(0, np.pi)
    m = Model(colours=_colours(rng, ["disk", "bulge"]))
    m.add_system(rotation(beta))
    q_proj = float(np.hypot(np.cos(np.radians(incl)), 1.5 * hz / h))
    fb = rng.uniform(0.25, 0.45) if bulge else 0.0
    # a thick disc (a flattened exponential: exponential vertical profile, a few arcsec thick) holds
    # 20-35 % of the disc light around the thin one
    f_thick = rng.uniform(0.20, 0.35)
    q_thick = rng.uniform(0.25, 0.40)
    disk = galsim.InclinedExponential(incl * galsim.degrees, scale_radius=h, scale_height=hz)
    m.add("disk", flux * (1 - fb) * (1 - f_thick), disk)
    m.add("disk", flux * (1 - fb) * f_thick, _sersic(1.0, r_disk * rng.uniform(0.9, 1.1)).transform(
        *squash(q_thick).ravel()))
    params = dict(r_half=r_disk, sersic_n=1.0, q=q_proj, beta=beta, inclination_deg=incl, scale_height=hz,
                  bulge_frac=fb, thick_frac=f_thick, thick_q=q_thick, extent=3.6 * r_disk)
    if bulge:
        r_b = max(rng.uniform(0.25, 0.40) * r_disk, 0.6)
        q_b = rng.uniform(0.65, 0.9)
        n_b = float(rng.choice([2.5, 3.0, 3.5, 4.0]))
        m.add("bulge", flux * fb, _sersic(n_b, r_b).transform(*squash(q_b).ravel()))
        params.update(bulge_r_half=r_b, bulge_q=q_b, bulge_n=n_b)
    return m, params


def _edge_on_no_bulge(rng, flux, scale):
    return _edge_on(rng, flux, scale, bulge=False)


def _edge_on_with_bulge(rng, flux, scale):
    return _edge_on(rng, flux, scale, bulge=True)


def _disturbed(rng, flux, scale):
    r = rng.uniform(2.2, 3.8) * scale
    n = float(rng.choice([1.0, 1.5]))
    q = rng.uniform(0.5, 0.9)
    beta = rng.uniform(0, np.pi)
    psi = rng.uniform(0, 2 * np.pi)           # side of the lopsided lobe
    f_lobe, f_clumps, f_tail = rng.uniform(0.20, 0.35), rng.uniform(0.08, 0.16), rng.uniform(0.12, 0.20)
    m = Model(colours=_colours(rng, ["disk", "arms", "knots", "tail"]))
    m.add_system(np.eye(2))
    main = _sersic(n, r).transform(*(rotation(beta) @ squash(q)).ravel())
    m.add("disk", flux * (1 - f_lobe - f_clumps - f_tail), main)
    d = rng.uniform(0.5, 1.0) * r
    lobe = _sersic(1.0, rng.uniform(0.5, 0.8) * r).transform(
        *(rotation(rng.uniform(0, np.pi)) @ squash(rng.uniform(0.4, 0.9))).ravel()).shift(d * np.cos(psi),
                                                                                         d * np.sin(psi))
    m.add("arms", flux * f_lobe, lobe)
    nc = int(rng.integers(4, 11))
    centre = 0.6 * r * np.array([np.cos(psi), np.sin(psi)])
    pts = centre + rng.normal(0.0, 0.7 * r, (nc, 2))
    m.add("knots", flux * f_clumps, fields.blobs(pts, rng.lognormal(0, 0.6, nc), rng.uniform(0.25, 0.5, nc)))
    r1 = rng.uniform(2.2, 3.2) * r
    m.add("tail", flux * f_tail, fields.arc(r0=0.8 * r, r1=r1, phi0=psi + np.pi + rng.uniform(-0.5, 0.5),
                                            dphi=rng.choice([-1, 1]) * rng.uniform(0.6, 1.4), w0=0.5,
                                            w1=rng.uniform(1.0, 1.8), fade=rng.uniform(0.6, 1.2)))
    return m, dict(r_half=r, sersic_n=n, q=q, beta=beta, lobe_frac=f_lobe, tail_frac=f_tail,
                   extent=max(r1 + 2.0, 3.5 * r))


def _merging(rng, flux, scale):
    r1 = rng.uniform(1.8, 3.0) * scale
    n1, n2 = float(rng.choice([1.0, 1.5, 2.5, 4.0])), float(rng.choice([1.0, 1.5, 2.5, 4.0]))
    q1, q2 = rng.uniform(0.5, 0.95), rng.uniform(0.5, 0.95)
    b1, b2 = rng.uniform(0, np.pi), rng.uniform(0, np.pi)
    ratio = rng.uniform(0.35, 1.0)
    r2 = r1 * np.sqrt(ratio) * rng.uniform(0.8, 1.2)
    f_tails, f_bridge, f_knots = rng.uniform(0.16, 0.28), rng.uniform(0.02, 0.05), 0.03
    body = flux * (1 - f_tails - f_bridge - f_knots)
    F1, F2 = body / (1 + ratio), body * ratio / (1 + ratio)
    sep = rng.uniform(0.8, 1.5) * (r1 + r2)
    psi = rng.uniform(0, 2 * np.pi)
    u = np.array([np.cos(psi), np.sin(psi)])
    p1, p2 = -sep * F2 / (F1 + F2) * u, sep * F1 / (F1 + F2) * u   # light-weighted centre at the origin
    groups = ["bulge", "disk", "tail", "knots"]
    m = Model(colours=_colours(rng, groups))
    s0 = m.add_system(np.eye(2))
    s1 = m.add_system(np.eye(2), p1)
    s2 = m.add_system(np.eye(2), p2)
    for F, n, r, q, b, s in ((F1, n1, r1, q1, b1, s1), (F2, n2, r2, q2, b2, s2)):
        m.add("bulge" if n >= 2.5 else "disk", F, _sersic(n, r).transform(*(rotation(b) @ squash(q)).ravel()), s)
    sense = rng.choice([-1, 1])
    tail_len = rng.uniform(2.5, 4.0)
    for r, s, phi0, share in ((r1, s1, psi + np.pi, 1 / (1 + ratio)), (r2, s2, psi, ratio / (1 + ratio))):
        m.add("tail", flux * f_tails * share,
              fields.arc(r0=0.8 * r, r1=tail_len * r, phi0=phi0 + rng.uniform(-0.4, 0.4),
                         dphi=sense * rng.uniform(0.8, 1.6), w0=0.5, w1=rng.uniform(0.9, 1.6),
                         fade=rng.uniform(0.7, 1.3)), s)
    m.add("tail", flux * f_bridge, fields.bridge(p1, p2, width=0.8, sag=rng.uniform(-1.5, 1.5)), s0)
    nk = int(rng.integers(3, 9))
    pts = p1 + rng.normal(0, 1.5 * r1, (nk, 2))
    m.add("knots", flux * f_knots, fields.blobs(pts, rng.lognormal(0, 0.5, nk), rng.uniform(0.25, 0.4, nk)), s0)
    extent = sep / 2 + tail_len * max(r1, r2) + 1.5
    return m, dict(r_half=r1, sersic_n=n1, q=q1, beta=b1, separation=sep, flux_ratio=ratio, extent=extent)


RECIPES = {
    "disturbed": _disturbed,
    "merging": _merging,
    "round_smooth": _round_smooth,
    "in_between_round_smooth": _in_between_round_smooth,
    "cigar_smooth": _cigar_smooth,
    "barred_spiral": _barred_spiral,
    "unbarred_tight_spiral": _unbarred_tight_spiral,
    "unbarred_loose_spiral": _unbarred_loose_spiral,
    "edge_on_no_bulge": _edge_on_no_bulge,
    "edge_on_with_bulge": _edge_on_with_bulge,
}

TRACTOR_TYPE = {"round_smooth": None, "in_between_round_smooth": None, "cigar_smooth": None,
                "disturbed": "SER", "merging": "SER"}  # None: DEV for n = 4 else SER; disks: EXP


def galaxy_model(class_key: str, rng: np.random.Generator, mag_r: float | None = None) -> tuple[Model, dict]:
    """The light model of one galaxy of class ``class_key`` and its truth (before PSF and noise)."""
    if class_key not in RECIPES:
        raise ConfigError(f"unknown galaxy class {class_key!r}; known: {', '.join(RECIPES)}")
    mag_r = float(rng.uniform(*MAG_RANGE) if mag_r is None else mag_r)
    flux = float(mag_to_flux(mag_r))
    scale = 10.0 ** (SIZE_SLOPE * (mag_r - 17.0))   # brighter galaxies are larger (x1.68 at r=15.5, x0.50 at r=19)
    model, p = RECIPES[class_key](rng, flux, scale)
    pa, e1, e2 = _tractor_shape(p["q"], p["beta"])
    ttype = TRACTOR_TYPE.get(class_key, "EXP")
    if ttype is None:
        ttype = "DEV" if p["sersic_n"] == 4.0 else "SER"
    params = {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in p.items()
              if k not in ("r_half", "sersic_n", "q", "beta", "extent")}
    truth = dict(class_key=class_key, class_index=class_keys().index(class_key), type=ttype, mag_r=mag_r,
                 r_half=float(p["r_half"]), sersic_n=float(p["sersic_n"]), axis_ratio=float(p["q"]),
                 pa_deg=pa, e1=e1, e2=e2, extent=float(p["extent"]), params=params)
    return model, truth


def auto_stamp(extent_arcsec: float, pixscale: float, max_stamp: int = MAX_STAMP) -> int:
    """An even stamp size (px) holding a source whose light reaches ``extent_arcsec`` from its centre."""
    s = int(np.ceil(2 * extent_arcsec / pixscale / 2)) * 2
    return int(np.clip(s, MIN_STAMP, max(max_stamp, MIN_STAMP)))


_NOMINAL: dict = {}


def _kernels(psf, bands, pixscale) -> list[np.ndarray]:
    if psf is None:
        key = (bands, pixscale)
        if key not in _NOMINAL:
            _NOMINAL[key] = Conditions.nominal(bands, pixscale).kernels()
        return _NOMINAL[key]
    if isinstance(psf, Conditions):
        if psf.bands != bands:
            raise ConfigError(f"conditions are for bands {psf.bands}, not {bands}")
        return psf.kernels()
    psf = list(psf)
    if len(psf) != len(bands):
        raise ConfigError(f"need one PSF per band ({len(bands)}), got {len(psf)}")
    return [psf_kernel(p, pixscale) for p in psf]


def _band_truth(truth: dict, bands, fluxes) -> None:
    for b, f in zip(bands, fluxes):
        truth[f"flux_{b}"] = float(f)
        truth[f"mag_{b}"] = float(flux_to_mag(f))


def draw_galaxy(class_key: str, rng: np.random.Generator, *, pixscale: float = PIXSCALE, stamp_size: int | None = None,
                psf=None, bands=BANDS, mag_r: float | None = None, offset=(0.0, 0.0),
                max_stamp: int = MAX_STAMP) -> tuple[np.ndarray, dict]:
    """One noiseless galaxy of class ``class_key``: ((bands, S, S) float32 nanomaggies, truth dict).

    ``psf``: None (nominal Moffat per band), a :class:`Conditions`, or one galsim profile or odd-sized
    kernel array per band. ``stamp_size`` None picks an even size from the galaxy's extent
    (48..``max_stamp`` px). The galaxy's centre is ``offset`` (pixels) from the stamp's true centre,
    pixel ``((S-1)/2, (S-1)/2)`` in 0-based (x, y). Truth: class, Tractor-like type, magnitudes and
    fluxes per band, ``r_half`` (arcsec) and ``sersic_n`` of the main body, axis ratio, position angle
    (deg east of north), e1/e2, and the class parameters (pitch angle, bulge fraction, ...).
    """
    model, truth = galaxy_model(class_key, rng, mag_r)
    return draw_model(model, truth, pixscale=pixscale, stamp_size=stamp_size, psf=psf, bands=bands, offset=offset,
                      max_stamp=max_stamp)


def draw_model(model: Model, truth: dict, *, pixscale: float = PIXSCALE, stamp_size: int | None = None, psf=None,
               bands=BANDS, offset=(0.0, 0.0), max_stamp: int = MAX_STAMP) -> tuple[np.ndarray, dict]:
    """Render a :func:`galaxy_model` (see :func:`draw_galaxy`); ``truth`` is completed and returned."""
    bands = check_bands(bands)
    auto = auto_stamp(truth["extent"], pixscale, max_stamp)
    size = int(stamp_size) if stamp_size else auto
    if size < 8:
        raise ConfigError(f"stamp_size must be at least 8 px, got {size}")
    # render on a canvas at least as large as the galaxy needs (same parity, so the centres agree),
    # tapered to zero at its edge, and cut the requested stamp from its middle
    canvas = max(size, auto + (auto - size) % 2)
    img = render(model, bands, _kernels(psf, bands, pixscale), canvas, pixscale, offset, taper=True)
    if canvas > size:
        c0 = (canvas - size) // 2
        img = np.ascontiguousarray(img[:, c0:c0 + size, c0:c0 + size])
    truth = dict(truth)
    _band_truth(truth, bands, [model.total_flux(b) for b in bands])
    truth["stamp_size"] = size
    return img, truth


def star_colours(rng: np.random.Generator) -> tuple[float, float]:
    """(g-r, r-z) on a rough stellar locus: r-z ~ 0.5 (g-r), steepening for M dwarfs (g-r > 1.25)."""
    gr = rng.uniform(0.25, 1.55)
    rz = 0.48 * gr + 0.02 + 4.0 * max(0.0, gr - 1.25) + rng.normal(0.0, 0.05)
    return float(gr), float(rz)


def star_magnitude(rng: np.random.Generator, lo: float = STAR_MAG_RANGE[0], hi: float = STAR_MAG_RANGE[1],
                   slope: float = STAR_COUNT_SLOPE) -> float:
    """A magnitude from dN/dm ~ 10**(slope m) on [lo, hi] (more faint stars than bright)."""
    a, b = 10 ** (slope * lo), 10 ** (slope * hi)
    return float(np.log10(a + rng.uniform() * (b - a)) / slope)


def draw_star(rng: np.random.Generator, *, pixscale: float = PIXSCALE, psf=None, bands=BANDS,
              mag_r: float | None = None, stamp_size: int | None = None, offset=(0.0, 0.0)) -> tuple[np.ndarray, dict]:
    """One star (the PSF, pixel-integrated, per band): ((bands, S, S) float32 nanomaggies, truth dict).

    ``psf``: None (nominal), a :class:`Conditions`, or one galsim profile per band.
    """
    import galsim

    bands = check_bands(bands)
    if psf is None:
        psf = Conditions.nominal(bands, pixscale)
    psfs = [psf.psf(b) for b in bands] if isinstance(psf, Conditions) else list(psf)
    if len(psfs) != len(bands) or not all(isinstance(p, galsim.GSObject) for p in psfs):
        raise ConfigError("draw_star needs a Conditions or one galsim profile per band")
    mag_r = star_magnitude(rng) if mag_r is None else float(mag_r)
    gr, rz = star_colours(rng)
    dm = {"g": gr, "r": 0.0, "i": -0.5 * rz, "z": -rz}
    fluxes = [float(mag_to_flux(mag_r + dm[b])) for b in bands]
    size = int(stamp_size) if stamp_size else (64 if mag_r > 16 else 128)
    out = np.empty((len(bands), size, size), dtype=np.float32)
    im = galsim.ImageD(size * OVERSAMPLE, size * OVERSAMPLE, scale=pixscale / OVERSAMPLE)
    for i, (p, f) in enumerate(zip(psfs, fluxes)):  # pixel-integrated like the galaxies: oversample, bin
        p.withFlux(f).drawImage(image=im, method="no_pixel", offset=(offset[0] * OVERSAMPLE, offset[1] * OVERSAMPLE))
        out[i] = bin_pixels(im.array)
    truth = dict(class_key="star", class_index=-1, type="PSF", mag_r=mag_r, r_half=0.0, sersic_n=0.0,
                 axis_ratio=1.0, pa_deg=0.0, e1=0.0, e2=0.0, extent=size * pixscale / 2, params={},
                 stamp_size=size)
    _band_truth(truth, bands, fluxes)
    return out, truth
