#!/bin/sh
# Makes docs/img/sky_real_vs_sim.jpg (docs/simulate.md, "Does it look like the sky?"): the four real
# DECaLS cubes of tests/data next to one simulated galaxy of each class, all cut with
# `galaxalign-batch cutout` (32" at 128 px, the viewer's lupton stretch, north up). The simulated
# galaxies are, per class, the most isolated catalogued one of r 15.5-17 (brick-primary, >= 64 px
# from the image edge, no maskbits) in a 4-brick simulated survey (`galaxalign-batch simulate`, seed 0: the demo's sky). With OLD=/path/to/old/source (a
# source tree of an earlier generator on PYTHONPATH, e.g. `git archive b7d5ef3 galaxalign_batch |
# tar -x -C /tmp/old`) a third row shows that generator's galaxies. Run from the repository root:
#   sh docs/img/make_sky_pictures.sh [OLD]
set -e
W=${TMPDIR:-/tmp}/sky-pictures
rm -rf "$W" && mkdir -p "$W/real"
D=tests/data/decals_cutouts
for c in a b c e; do
    f=$D/example_$c.fits
    if [ ! -f "$f" ]; then gzip -dc "$f.gz" > "$W/example_$c.fits"; f=$W/example_$c.fits; fi
    RA=$(python -c "from astropy.io import fits; print(fits.getheader('$f')['CRVAL1'])")
    DEC=$(python -c "from astropy.io import fits; print(fits.getheader('$f')['CRVAL2'])")
    galaxalign-batch cutout --tiles "$f" --ra "$RA" --dec "$DEC" --angular-size 32 --pixels 128 --out "$W/real/$c.png"
done
sim() {  # sim NAME: simulate the demo's sky with the galaxalign_batch on PYTHONPATH, cut one galaxy per class
    galaxalign-batch simulate --out "$W/$1" --bricks 4 --size 1024 --seed 0 > /dev/null
    python - "$W/$1" <<'PY'
import glob, sys
import numpy as np
from astropy.table import Table, vstack
root = sys.argv[1]
t = vstack([Table.read(p) for p in sorted(glob.glob(f"{root}/tractor/*/tractor-*.fits"))], metadata_conflicts="silent")
xyz = np.stack([np.cos(np.radians(t["dec"])) * np.cos(np.radians(t["ra"])),
                np.cos(np.radians(t["dec"])) * np.sin(np.radians(t["ra"])), np.sin(np.radians(t["dec"]))], 1)
cosd = np.clip(xyz @ xyz.T, -1, 1)
np.fill_diagonal(cosd, -1)
t["nn"] = np.degrees(np.arccos(cosd.max(1))) * 3600            # arcsec to the nearest other source
ok = (t["brick_primary"] & (t["true_mag_r"] >= 15.5) & (t["true_mag_r"] < 17.0) & (t["maskbits"] == 0)
      & (t["bx"] > 64) & (t["by"] > 64) & (t["bx"] < 1024 - 64) & (t["by"] < 1024 - 64))
t = t[ok]
with open(f"{root}/targets.csv", "w") as f:
    f.write("name,ra,dec\n")
    for k in sorted(set(t["true_class_key"]) - {"star"}):
        s = t[t["true_class_key"] == k]
        r = s[int(np.argmax(s["nn"]))]                            # the most isolated one
        f.write(f"{k},{r['ra']},{r['dec']}\n")
        print(k, round(float(r["true_mag_r"]), 2), round(float(r["true_r_half"]), 2), round(float(r["nn"]), 1))
PY
    galaxalign-batch cutout --tiles "$W/$1" --targets "$W/$1/targets.csv" --angular-size 32 --pixels 128 --out "$W/$1/cut" > /dev/null
}
sim new
ROWS="real new"
if [ -n "$1" ]; then PYTHONPATH="$1" sim old; ROWS="$ROWS old"; fi
python - "$W" $ROWS <<'PY'
import glob, os, sys
from PIL import Image, ImageDraw
w, rows = sys.argv[1], sys.argv[2:]
title = {"real": "real DECaLS (tests/data)", "new": "simulated (this generator)", "old": "simulated (old generator)"}
S = 128
files = {r: sorted(glob.glob(f"{w}/{r}/*.png") if r == "real" else glob.glob(f"{w}/{r}/cut/*.png")) for r in rows}
ncol = max(len(v) for v in files.values())
im = Image.new("RGB", (ncol * S, len(rows) * (S + 14)), (255, 255, 255))
d = ImageDraw.Draw(im)
for i, r in enumerate(rows):
    y = i * (S + 14)
    for j, f in enumerate(files[r]):
        im.paste(Image.open(f).convert("RGB"), (j * S, y + 14))
        d.text((j * S + 2, y + 1), os.path.basename(f)[:-4].replace("unbarred_", "")[:21], fill=(0, 0, 0))
    d.text((2, y + 16), title[r], fill=(255, 255, 0))
im.save("docs/img/sky_real_vs_sim.jpg", quality=85, optimize=True)
print("docs/img/sky_real_vs_sim.jpg", os.path.getsize("docs/img/sky_real_vs_sim.jpg"), "bytes")
PY
