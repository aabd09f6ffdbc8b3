"""Writers for the DR9/DR10 file formats: fpacked coadd images, Tractor catalogues, survey-bricks.

Compression follows legacypipe (``LegacySurveyData.get_compression_args``): images RICE_1 with
100x100 tiles and an absolute quantisation step of 1e-4 nanomaggy with SUBTRACTIVE_DITHER_2
(fpack ``qz -1e-4``); invvar RICE_1 with q = 16 (we dither it with SUBTRACTIVE_DITHER_2 too, which
keeps zero inverse variances exactly zero); maskbits HCOMPRESS (lossless for integers). The dither
seed is fixed per brick so the same simulation gives the same bytes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from galaxalign_batch import atomic
from galaxalign_batch.survey.layout import BrickInfo

RELEASE = 9999              # a DR9-like release number that no real release uses
SURVEY = "LegacySurvey-sim"


def tile_size(n: int, base: int = 100) -> int:
    """legacypipe's tile size: 100 px unless that leaves a partial tile of 1-3 px."""
    if n <= base:
        return n
    t = base
    while 0 < n % t < 4:
        t += 1
    return t


def brick_header(brick: BrickInfo, wcs, bands, band: str | None, generator: str) -> list[dict]:
    """Header cards of a coadd image as legacypipe writes them (version header + TAN WCS + band cards);
    ``wcs`` None gives the brick cards only (for catalogues)."""
    cards = [
        ("SURVEY", SURVEY, "Simulated data (galaxalign-batch)"),
        ("SIMULATD", True, "This file is simulated"),
        ("SIMGENV", generator, "galaxalign_batch.simulate generator version"),
        ("RELEASE", RELEASE, "Release number (simulated, DR9-like)"),
        ("BRICKNAM", brick.brickname, "LegacySurvey brick RRRr[pm]DDd"),
        ("BRICK", brick.brickname, "Brick name (alias of BRICKNAM)"),
        ("BRICKID", brick.brickid, "LegacySurvey brick id"),
        ("RAMIN", brick.ra1, "Brick RA min"),
        ("RAMAX", brick.ra2, "Brick RA max"),
        ("DECMIN", brick.dec1, "Brick Dec min"),
        ("DECMAX", brick.dec2, "Brick Dec max"),
        ("BRICKRA", brick.ra, "Brick center"),
        ("BRICKDEC", brick.dec, "Brick center"),
        ("CENTRA", brick.ra, "Image center RA"),
        ("CENTDEC", brick.dec, "Image center Dec"),
        ("BANDS", "".join(bands), "Bands of this brick"),
    ]
    if wcs is None:
        return [dict(name=k, value=v, comment=c) for k, v, c in cards]
    w = wcs.wcs
    cards += [
        ("CTYPE1", "RA---TAN", "TAN (gnomonic) projection"),
        ("CTYPE2", "DEC--TAN", "TAN (gnomonic) projection"),
        ("EQUINOX", 2000.0, "Equatorial coordinates definition (yr)"),
        ("RADESYS", "ICRS", ""),
        ("CRVAL1", float(w.crval[0]), "RA  of reference point"),
        ("CRVAL2", float(w.crval[1]), "DEC of reference point"),
        ("CRPIX1", float(w.crpix[0]), "X reference pixel"),
        ("CRPIX2", float(w.crpix[1]), "Y reference pixel"),
        ("CUNIT1", "deg", "X pixel scale units"),
        ("CUNIT2", "deg", "Y pixel scale units"),
        ("CD1_1", float(w.cd[0, 0]), "Transformation matrix"),
        ("CD1_2", float(w.cd[0, 1]), ""),
        ("CD2_1", float(w.cd[1, 0]), ""),
        ("CD2_2", float(w.cd[1, 1]), ""),
    ]
    if band is not None:
        cards += [("BAND", band, "Band of this image"), ("FILTERX", band, "Filter short name")]
    return [dict(name=k, value=v, comment=c) for k, v, c in cards]


def write_image(path: Path, data: np.ndarray, cards: list[dict], kind: str, dither_seed: int) -> None:
    """Write one fpacked coadd (HDU 1) the way legacypipe does; ``kind``: image | invvar | maskbits."""
    import fitsio

    hdr = fitsio.FITSHDR()
    for c in cards:
        hdr.add_record(c)
    extra = {
        "image": [("IMTYPE", "image", "LegacySurveys image type"), ("PRODTYPE", "image", "NOAO image type"),
                  ("MAGZERO", 22.5, "Magnitude zeropoint"),
                  ("BUNIT", "nanomaggy", "AB mag = 22.5 - 2.5*log10(nanomaggy)")],
        "invvar": [("IMTYPE", "invvar", "LegacySurveys image type"), ("PRODTYPE", "wtmap", "NOAO image type"),
                   ("BUNIT", "1/nanomaggy^2", "Ivar of ABmag=22.5-2.5*log10(nmgy)")],
        "maskbits": [("IMTYPE", "maskbits", "LegacySurveys image type")],
    }[kind]
    for k, v, c in extra:
        hdr.add_record(dict(name=k, value=v, comment=c))
    t = (tile_size(data.shape[0]), tile_size(data.shape[1]))
    if kind == "maskbits":
        comp = dict(compress="HCOMPRESS", tile_dims=t)
    else:
        comp = dict(compress="RICE", tile_dims=t, qlevel=-1e-4 if kind == "image" else 16.0,
                    qmethod="SUBTRACTIVE_DITHER_2", dither_seed=int(dither_seed))
    with atomic.replacing(path) as tmp, fitsio.FITS(tmp, "rw", clobber=True) as f:
        f.write(data, header=hdr, **comp)


def write_table(path: Path, table: np.ndarray, cards: list[dict] | None = None, extname: str | None = None) -> None:
    """Write a structured array as a FITS binary table in HDU 1 (atomically)."""
    import fitsio

    hdr = fitsio.FITSHDR()
    for c in cards or []:
        hdr.add_record(c)
    with atomic.replacing(path) as tmp, fitsio.FITS(tmp, "rw", clobber=True) as f:
        f.write(table, header=hdr, extname=extname)


def survey_bricks_table(bricks: list[BrickInfo]) -> np.ndarray:
    """Rows of ``survey-bricks.fits`` (lower-case column names as in the DR9 data model)."""
    dt = [("brickname", "S8"), ("brickid", ">i4"), ("brickq", ">i2"), ("brickrow", ">i4"), ("brickcol", ">i4"),
          ("ra", ">f8"), ("dec", ">f8"), ("ra1", ">f8"), ("ra2", ">f8"), ("dec1", ">f8"), ("dec2", ">f8")]
    t = np.zeros(len(bricks), dtype=dt)
    for i, b in enumerate(sorted(bricks, key=lambda b: b.brickid)):
        t[i] = (b.brickname, b.brickid, (b.brickcol % 2) + (b.brickrow % 2) * 2 if b.brickrow else 1,
                b.brickrow, b.brickcol, b.ra, b.dec, b.ra1, b.ra2, b.dec1, b.dec2)
    return t
