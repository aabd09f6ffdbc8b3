"""`galaxalign-batch demo`: simulate, train, embed, classify, search, join and report on the embedded default."""

from galaxalign_batch.cli._placeholder import placeholder


def register(sub) -> None:
    placeholder(sub, "demo", "simulate, train, embed, classify, search, join and report on the embedded default", "downstream issue")
