#!/bin/sh
# Makes the pictures of docs/preprocess.md ("Orientation and stretches") with `galaxalign-batch cutout`
# from the real DECaLS cube tests/data/decals_cutouts/example_b.fits. Run from the repository root:
#   sh docs/img/make_pictures.sh
set -e
T=tests/data/decals_cutouts/example_b.fits
RA=$(python -c "from astropy.io import fits; print(fits.getheader('$T')['CRVAL1'])")
DEC=$(python -c "from astropy.io import fits; print(fits.getheader('$T')['CRVAL2'])")
for s in lupton gz-decals asinh; do
    galaxalign-batch cutout --tiles $T --ra $RA --dec $DEC --angular-size 40 --pixels 160 --stretch $s --out docs/img/example_b_$s.png
done
galaxalign-batch cutout --tiles $T --ra $RA --dec $DEC --angular-size 40 --pixels 160 --stretch gz-decals --orientation fits \
    --out docs/img/example_b_gz-decals_fits-order.png
