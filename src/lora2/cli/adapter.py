"""Subcommands (being written)."""


def register(subparsers) -> None:  # noqa: D103 - placeholder until this module lands
    pass
