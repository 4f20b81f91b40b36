"""The ``quotelab`` command line."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from quotelab import __version__
from quotelab.errors import QuotelabError

app = typer.Typer(
    name="quotelab",
    help="Market-making pricing research: convert data, compose strategies from plugins, backtest them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"quotelab {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """quotelab command line."""


CatalogOpt = Annotated[Path, typer.Option("--catalog", help="Event catalog folder.")]


def main() -> None:
    try:
        app()
    except QuotelabError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
