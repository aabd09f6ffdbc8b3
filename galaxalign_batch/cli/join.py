"""`galaxalign-batch join`: cross-match a catalog with an embedding store."""

from galaxalign_batch.cli._placeholder import placeholder


def register(sub) -> None:
    placeholder(sub, "join", "cross-match a catalog with an embedding store", "downstream issue")
