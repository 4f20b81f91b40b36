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


@app.command()
def synth(
    catalog: CatalogOpt,
    seed: Annotated[int, typer.Option("--seed", help="Random seed: same seed and arguments, same files.")] = 7,
    start: Annotated[
        str, typer.Option("--start", help="Start, ISO date-time in UTC, e.g. 2024-01-01T00:00:00.")
    ] = "2024-01-01T00:00:00",
    duration: Annotated[
        str, typer.Option("--duration", help="Length, e.g. 90s, 15m, 1h, 1h30m, 2d; split into UTC days.")
    ] = "1h",
    assets: Annotated[
        str, typer.Option("--assets", help="Comma-separated: perp (SYNPERP), spot (SYNSPOT).")
    ] = "perp,spot",
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as one JSON object.")] = False,
) -> None:
    """Generate a seeded synthetic spot/perp market (venue `synthetic`) into the catalog."""
    import json

    from quotelab.data import synth as synth_mod

    summary = synth_mod.generate(
        catalog, seed=seed, start=start, duration_s=synth_mod.parse_duration(duration), assets=assets
    )
    if as_json:
        typer.echo(json.dumps(summary, sort_keys=True))
        return
    typer.echo(f"synthetic market, seed {seed}, {summary['start']} + {duration} -> {catalog} "
               f"({summary['seconds']:.1f} s)")
    for symbol, info in summary["symbols"].items():
        typer.echo(f"  {symbol}: {info['events']:,} events, {info['trades']:,} trades, days {', '.join(info['days'])}")


def main() -> None:
    try:
        app()
    except QuotelabError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
