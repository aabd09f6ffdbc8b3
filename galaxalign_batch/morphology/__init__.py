"""Morphological parameters of sources: statmorph measurements per source, and regression heads from
store embeddings to them (see docs/morphology.md)."""

from galaxalign_batch.morphology.catalog import (MorphologySummary, measure_jobs, measure_store, measure_tiles,
                                                 read_table, write_table)
from galaxalign_batch.morphology.measure import MEASURED_COLUMNS, MorphologyConfig, measure_source, measure_stamp

__all__ = ["MorphologyConfig", "MorphologySummary", "MEASURED_COLUMNS", "measure_stamp", "measure_source",
           "measure_jobs", "measure_store", "measure_tiles", "read_table", "write_table"]
