"""galaxalign-batch: GalaxAlign tri-modal fine-tuning and survey-scale embedding of galaxy images.

Stages of the data's path, one subpackage each:

- :mod:`galaxalign_batch.survey`      survey I/O: Legacy Survey bricks, cutout cubes, sources
- :mod:`galaxalign_batch.simulate`    the simulated Legacy-Survey-like survey (embedded default)
- :mod:`galaxalign_batch.preprocess`  Numba cutout, resample and stretch
- :mod:`galaxalign_batch.model`       GalaxAlign model, losses, training, evaluation
- :mod:`galaxalign_batch.engine`      distributed embedding with Ray
- :mod:`galaxalign_batch.store`       the Zarr embedding store
- :mod:`galaxalign_batch.downstream`  classification, search, joins, reports
"""

from galaxalign_batch._version import __version__
from galaxalign_batch.errors import GalaxAlignError, TileError, ConfigError

__all__ = ["__version__", "GalaxAlignError", "TileError", "ConfigError"]
