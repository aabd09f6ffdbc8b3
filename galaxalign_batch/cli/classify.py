"""`galaxalign-batch classify`: classify every source of an embedding store."""

from galaxalign_batch.cli._placeholder import placeholder


def register(sub) -> None:
    placeholder(sub, "classify", "classify every source of an embedding store", "downstream issue")
