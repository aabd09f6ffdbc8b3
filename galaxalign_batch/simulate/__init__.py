"""The simulated Legacy Survey: galsim galaxies of the 10 Galaxy10 classes and stars, Moffat PSF,
sky noise at survey depth, written in the DR9/DR10 file layout; and a labelled cutout set.

See docs/simulate.md.
"""

from galaxalign_batch.simulate.galaxies import GENERATOR_VERSION, class_keys, draw_galaxy, draw_star
from galaxalign_batch.simulate.labelled import simulate_labelled
from galaxalign_batch.simulate.observing import Conditions
from galaxalign_batch.simulate.survey import simulate_survey

__all__ = ["simulate_survey", "simulate_labelled", "draw_galaxy", "draw_star", "class_keys", "Conditions",
           "GENERATOR_VERSION"]
