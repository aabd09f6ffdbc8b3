"""`galaxalign-batch search`: similarity search in an embedding store."""

from galaxalign_batch.cli._placeholder import placeholder


def register(sub) -> None:
    placeholder(sub, "search", "similarity search in an embedding store", "downstream issue")
