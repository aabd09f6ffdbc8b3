"""`galaxalign-batch evaluate`: zero-shot classification and retrieval metrics of a checkpoint."""

from galaxalign_batch.cli._placeholder import placeholder


def register(sub) -> None:
    placeholder(sub, "evaluate", "zero-shot classification and retrieval metrics of a checkpoint", "GalaxAlign issue")
