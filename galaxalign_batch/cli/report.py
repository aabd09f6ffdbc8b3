"""`galaxalign-batch report`: HTML report of an embedding store."""

from galaxalign_batch.cli._placeholder import placeholder


def register(sub) -> None:
    placeholder(sub, "report", "HTML report of an embedding store", "downstream issue")
