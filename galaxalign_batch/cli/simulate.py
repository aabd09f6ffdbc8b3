"""`galaxalign-batch simulate`: write a simulated Legacy Survey."""

from galaxalign_batch.cli._placeholder import placeholder


def register(sub) -> None:
    placeholder(sub, "simulate", "write a simulated Legacy Survey", "Foundation issue")
