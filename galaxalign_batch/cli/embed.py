"""`galaxalign-batch embed`: embed survey tiles into a Zarr store with Ray."""

from galaxalign_batch.cli._placeholder import placeholder


def register(sub) -> None:
    placeholder(sub, "embed", "embed survey tiles into a Zarr store with Ray", "survey engine issue")
