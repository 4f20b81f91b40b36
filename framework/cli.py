"""The ``quotelab`` command line."""

from __future__ import annotations

import functools
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Annotated, Any

import typer

from quotelab import __version__
from quotelab.errors import PluginError, QuotelabError, Stopped

NOTHING_KEPT = "nothing was kept: it writes its results only once it has finished"
OUT_AT_END = ("nothing was kept: it writes --out only once it has finished (a stop while it writes can leave some "
              "of those files in --out; run it again)")


class _Verbs(typer.Typer):
    """A Typer whose commands report a stop (Ctrl-C, SIGTERM) as one line saying what was kept.

    ``main`` makes SIGINT and SIGTERM raise :class:`quotelab.stopping.Interrupted` (a KeyboardInterrupt:
    ``except Exception`` wrappers let it through); each command's callback turns one that reaches it into
    :class:`~quotelab.errors.Stopped` before Typer would turn it into a silent exit 130. ``kept`` says
    what a stop of that verb keeps; a verb whose answer depends on how far it got (``convert``, ``synth``,
    ``batch``) raises its own ``Stopped``, which passes through untouched.

    Under a command's ``--json`` the whole command runs in :func:`_json_stdout`, so its stdout is its JSON
    alone whatever a plugin or library prints meanwhile; a verb prints its JSON with :func:`_print_json`
    or :func:`_emit_json` (a plain ``typer.echo`` would land on stderr).
    """

    prefix = ""  # a group's name and a space (``microprice ``), for the message

    def command(self, name: str | None = None, *, kept: str = NOTHING_KEPT, **kwargs: Any) -> Any:  # type: ignore[override]
        register = super().command(name, **kwargs)

        def decorator(f: Callable[..., Any]) -> Callable[..., Any]:
            json_flag = _json_param(f)

            @functools.wraps(f)
            def verb(*args: Any, **kw: Any) -> Any:
                from quotelab.stopping import stopped

                try:
                    with _json_stdout() if json_flag is not None and kw.get(json_flag) else nullcontext():
                        return f(*args, **kw)
                except KeyboardInterrupt as exc:
                    raise stopped(exc, f"{self.prefix}{name or f.__name__}: {kept}") from None

            register(verb)
            return f

        return decorator


app = _Verbs(
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
    debug: Annotated[
        bool, typer.Option("--debug", help="Print the full traceback of an error (also accepted after the command).")
    ] = False,
) -> None:
    """quotelab command line."""


CatalogOpt = Annotated[Path, typer.Option("--catalog", help="Event catalog folder.")]
# The grammar of every verb that reads a YAML: FILE, then --set and --catalog, meaning the same everywhere.
SetOpt = Annotated[list[str] | None, typer.Option(
    "--set", metavar="PATH=VALUE", help="Override a value before it is validated, e.g. quoter.params.half_spread=3, "
    "data.assets.perp.dates=[20240809] or forecast[0].alpha=2ticks; the value is read as YAML (repeatable, applied "
    "in order). PATH is a path of the YAML, or for batch and optimize of their base strategy (every run).")]
YamlCatalogOpt = Annotated[Path | None, typer.Option(
    "--catalog", help="Event catalog folder (wins over the YAML's catalog).")]
CompressionOpt = Annotated[str, typer.Option(
    "--compression", help="Day files: deflate (small) or none (~7x the disk, memory-mapped: ~10x faster to load).")]


def _json_param(f: Callable[..., Any]) -> str | None:
    """The name of the parameter of command ``f`` that is its ``--json`` flag (``json_``, ``as_json``), or
    None. Found by the flag it declares, so a new verb's ``--json`` is covered whatever it calls it."""
    from typer.utils import get_params_from_function

    for name, param in get_params_from_function(f).items():  # as Typer reads them: the option's flags
        if "--json" in (getattr(param.default, "param_decls", None) or ()):
            return name
    return None


# While a command runs in _json_stdout: the JSON it prints, held until stdout is back.
_json_held: list[str] | None = None


@contextmanager
def _json_stdout() -> Iterator[None]:
    """While in it, whatever would reach stdout goes to stderr, and the JSON the command prints
    (:func:`_print_json`) is held and printed to stdout on the way out, so a ``--json`` command's stdout is
    its JSON alone: a plugin's print (a Python signal runs inside the replay), a library's, Ray's driver
    printing its notes of dead workers to stdout from a thread of its own (log_to_driver does not cover
    them), a plugin's print in a worker process writing to the stdout it inherited. Both kinds of writer
    are moved: Python's sys.stdout, read when each print happens, and file descriptor 1, which C code
    writes to and worker processes inherit as they start. The held JSON is printed also when the command
    ends in an error or an exit code (``run``'s failed run, ``check-plugin``'s difference)."""
    global _json_held
    sys.stdout.flush()
    try:
        fd: int | None = sys.stdout.fileno()
        err = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # captured in this process (e.g. typer's CliRunner)
        fd = None
    saved = sys.stdout
    kept = None
    if fd is not None:
        kept = os.dup(fd)
        os.dup2(err, fd)
    sys.stdout = sys.stderr
    _json_held = []
    try:
        yield
    finally:
        held, _json_held = _json_held, None
        sys.stderr.flush()
        saved.flush()  # what went to it meanwhile through an older reference: still to stderr
        sys.stdout = saved
        if fd is not None and kept is not None:
            os.dup2(kept, fd)
            os.close(kept)
        for text in held:
            typer.echo(text)


def _emit_json(text: str) -> None:
    """Print a command's JSON text: held until the command ends if it runs in :func:`_json_stdout`."""
    if _json_held is None:
        typer.echo(text)
    else:
        _json_held.append(text)


def _print_json(obj: object) -> None:
    import orjson

    _emit_json(orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY, default=str).decode())


@app.command("run", kept="nothing was kept: a run writes --out only once it has finished, each file "
             "whole (a stop while they are written leaves each one as it was or new)")
def run_cmd(
    strategy: Annotated[Path, typer.Argument(help="Strategy YAML.")],
    catalog: YamlCatalogOpt = None,
    set_: SetOpt = None,
    out: Annotated[Path | None, typer.Option("--out", help="Folder for summary.json, stats and series.")] = None,
    json_: Annotated[bool, typer.Option("--json", help="Print the result as one JSON object.")] = False,
    strict: Annotated[bool, typer.Option(
        "--strict", help="Refuse to run a trained model on its own training days (in-sample).")] = False,
    check: Annotated[bool, typer.Option(
        "--check", help="Compile the kernels with bounds checking: a plugin kernel indexing outside its arrays "
                        "stops the run with an error naming it (slower; the results are the same otherwise).")] = False,
) -> None:
    """Validate, compose and backtest a strategy YAML."""
    from quotelab import progress
    from quotelab.backtest.engine import run_strategy
    from quotelab.errors import RunError
    from quotelab.outputs import check_output_dir

    check_output_dir(out)
    try:
        result = run_strategy(strategy, catalog=catalog, overrides=set_ or [], out_dir=out, strict=strict,
                              check=check, progress=progress.wanted(json_))
    except RunError as exc:
        if json_ and getattr(exc.result, "summary", None) is not None:
            _print_json(exc.result.summary)
        raise
    if json_:
        _print_json(result.summary)
        return
    from rich.console import Console
    from rich.table import Table

    s = result.summary
    table = Table(title=f"{s['name']}  ({strategy})", show_header=False)
    unit = s.get("pnl_unit", "")
    table.add_row("pnl", f"{s['pnl']:.6g} {unit}")
    if s.get("pnl_usd_method") not in ("USD", "at par"):
        table.add_row("pnl_usd", f"{s['pnl_usd']:.6g} USD ({s['pnl_usd_method']})")
    if s.get("pnl_bps_of_notional") is not None:
        table.add_row("pnl per traded notional", f"{s['pnl_bps_of_notional']:.4g} bps")
    table.add_row("funding", f"{s['funding']:.6g} {unit} ({len(s['settlements'])} settlements)")
    for key in ("num_trades", "position", "balance", "fee", "trading_volume", "steps", "quoting_steps",
                "warmup_steps", "nonfinite_skipped", "events", "compile_seconds", "run_seconds", "events_per_second"):
        table.add_row(key, f"{s[key]:.6g}" if isinstance(s[key], float) else str(s[key]))
    for key, value in (s.get("stats") or {}).items():
        table.add_row(key, f"{value:.6g}" if isinstance(value, float) else str(value))
    Console().print(table)
    if s.get("days"):  # days as columns, so it fits a narrow terminal
        days = Table(title=f"per UTC day (PnL in {unit})")
        days.add_column("")
        for row in s["days"]:
            days.add_column(row["day"], justify="right")
        for c in ("pnl", "spread", "inventory", "fees", "funding", "volume", "trades", "max_abs_position"):
            days.add_row(c.replace("max_abs_position", "max |position|"),
                         *(f"{r[c]:.6g}" if isinstance(r[c], float) else str(r[c]) for r in s["days"]))
        Console().print(days)
    if result.out_dir is not None:
        typer.echo(f"results written to {result.out_dir}")


@app.command("evaluate", kept=OUT_AT_END)
def evaluate_cmd(
    config: Annotated[Path, typer.Argument(help="Evaluation YAML (data, targets, horizons, estimators).")],
    catalog: YamlCatalogOpt = None,
    set_: SetOpt = None,
    out: Annotated[Path | None, typer.Option("--out", help="Folder for the tables (parquet, CSV) and PNGs.")] = None,
    strict: Annotated[bool, typer.Option(
        "--strict", help="Refuse to score a trained model on its own training days (in-sample).")] = False,
    json_: Annotated[bool, typer.Option("--json", help="Print the score table as one JSON object.")] = False,
) -> None:
    """Score fair values (and fair value + forecast) against future mids and the next trades."""
    from quotelab import progress
    from quotelab.outputs import check_output_dir
    from quotelab.research.evaluate import evaluate

    check_output_dir(out)
    progress.enable(progress.wanted(json_))
    result = evaluate(config, catalog=catalog, out_dir=out, strict=strict, overrides=set_ or [])
    if json_:
        _print_json({"summary": result.summary, "rows": result.rows})
        return
    from rich.console import Console
    from rich.table import Table

    if result.summary.get("score") == "trades":
        table = Table(title=f"{result.summary['name']}: (trade price - estimate)², n trades scored, undefined left out")
        width = max(len(r["estimator"]) for r in result.rows)
        for col in ("target", "estimator", "n", "undefined", "SSE", "MSE"):
            table.add_column(col, justify="left" if col in ("target", "estimator") else "right", no_wrap=True,
                             min_width=width if col == "estimator" else None)
        for r in result.rows:
            table.add_row(r["target"], r["estimator"], str(r["n"]), str(r["n_undefined"]), f"{r['sse']:.7g}",
                          f"{r['mse']:.7g}")
        Console().print(table)
        for c in result.summary["conventions"]:
            typer.echo(f"- {c}")
        if out is not None:
            typer.echo(f"tables written to {out}")
        return
    table = Table(title=f"{result.summary['name']}: mean squared error by horizon")
    horizons = [*result.summary["horizons"], "trade"]
    for col in ("target", "estimator", *horizons):
        table.add_column(col, justify="right" if col in horizons else "left")
    keyed = {(r["target"], r["estimator"], r["horizon"]): r for r in result.rows}
    for target in result.summary["targets"]:
        for est in result.summary["estimators"]:
            table.add_row(target, est, *(f"{keyed[(target, est, h)]['mse']:.6g}" for h in horizons))
    Console().print(table)
    if out is not None:
        typer.echo(f"tables and plots written to {out}")


@app.command("plugins")
def plugins_cmd(
    plugin: Annotated[
        list[Path] | None, typer.Option("--plugin", help="Also load this local plugin file (repeatable).")
    ] = None,
    json_: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
    markdown: Annotated[
        Path | None, typer.Option("--markdown", help="Write a Markdown reference page to this file.")
    ] = None,
) -> None:
    """List every registered component: role, name, params (defaults, units) and where it came from."""
    from quotelab.docs import describe_components, markdown_reference
    from quotelab.outputs import check_output_file
    from quotelab.strategy.registry import load_registry

    check_output_file(markdown, "--markdown")
    registry = load_registry(local_files=plugin or [])
    rows = describe_components(registry)
    if markdown is not None:
        markdown.parent.mkdir(parents=True, exist_ok=True)
        markdown.write_text(markdown_reference(rows))
        typer.echo(f"wrote {markdown}")
        return
    if json_:
        _print_json(rows)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="quotelab components")
    for col in ("role", "name", "params", "from"):
        table.add_column(col)
    for r in rows:
        params = ", ".join(
            f"{p['name']}={p['default']}" + (f" ({p['unit']})" if p.get("unit") else "") for p in r["params"]
        )
        table.add_row(r["role"], r["name"], params, r["source"])
    Console().print(table)


@app.command(kept="nothing was written to the catalog: synth commits its days together at the end (the same "
                  "seed and arguments give the same files: run it again)")
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
    compression: CompressionOpt = "deflate",
    funding_interval: Annotated[
        str, typer.Option("--funding-interval", help="Time between the perp's funding settlements, e.g. 8h.")
    ] = "8h",
    profile: Annotated[str, typer.Option(
        "--profile", help="demo (small, the default) or busy: the perp at the event rates and depth-message "
                          "sizes of the shared USD-M BTCUSDT capture, ~127 M events a day.")] = "demo",
    raw: Annotated[str | None, typer.Option(
        "--raw", help="Also write the perp as raw venue files for the converters: binance-usdm, tardis, or both "
                      "comma-separated; into --raw-dir.")] = None,
    raw_dir: Annotated[Path | None, typer.Option("--raw-dir", help="Folder for --raw's files.")] = None,
    raw_gzip: Annotated[bool, typer.Option("--raw-gzip/--raw-plain", help="Gzip the raw files.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as one JSON object.")] = False,
    arrival: Annotated[str | None, typer.Option(
        "--arrival", help="A,k[,A_sell,k_sell]: instead, a one-tick market (SYNARRIVAL) whose trades reach δ ticks "
                          "from the mid at rate A·exp(−kδ) per side, for `quotelab calibrate`.")] = None,
) -> None:
    """Generate a seeded synthetic spot/perp market (venue `synthetic`) into the catalog."""
    import json

    from quotelab.data import synth as synth_mod

    if arrival is not None:
        try:
            nums = [float(x) for x in arrival.split(",")]
        except ValueError:
            nums = []
        if len(nums) not in (2, 4):
            raise synth_mod.SynthError(f"--arrival {arrival!r}: expected A,k or A,k,A_sell,k_sell (numbers)")
        res = synth_mod.arrival_market(catalog, buy=(nums[0], nums[1]),
                                       sell=(nums[2], nums[3]) if len(nums) == 4 else None, seed=seed,
                                       start=start, duration_s=synth_mod.parse_duration(duration))
        if as_json:
            _emit_json(json.dumps(res, sort_keys=True))
        else:
            typer.echo(f"synthetic/{res['symbol']} {res['day']}: {res['events']:,} events -> {catalog}")
        return

    from quotelab.data import rawfiles

    raw_formats = [f.strip() for f in raw.split(",") if f.strip()] if raw else []
    bad = [f for f in raw_formats if f not in rawfiles.FORMATS]
    if bad or (raw is not None and not raw_formats):
        raise synth_mod.SynthError(f"--raw {raw!r}: choose from {', '.join(rawfiles.FORMATS)} (comma-separated)")
    if raw_formats and raw_dir is None:
        raise synth_mod.SynthError("--raw needs --raw-dir, the folder for the raw files")
    if raw_formats and "perp" not in synth_mod.parse_assets(assets):
        raise synth_mod.SynthError("--raw writes the perp (binance-usdm and tardis are futures formats); "
                                   "add perp to --assets")
    summary = synth_mod.generate(
        catalog, seed=seed, start=start, duration_s=synth_mod.parse_duration(duration), assets=assets,
        compression=compression, funding_interval_s=synth_mod.parse_duration(funding_interval, "--funding-interval"),
        profile=profile,
    )
    perp = synth_mod.PROFILES.get(profile, synth_mod.ASSETS)["perp"].symbol
    try:
        summary["raw"] = [rawfiles.write(catalog, synth_mod.VENUE, perp, f, raw_dir, gz=raw_gzip,
                                         days=summary["symbols"][perp]["days"]) for f in raw_formats]
    except KeyboardInterrupt as exc:
        from quotelab.stopping import stopped

        raise stopped(exc, f"synth: every day was written to {catalog}; of the --raw files in {raw_dir}, those "
                           f"written before the stop are whole and the rest missing (run synth again to write "
                           f"them all: the same seed gives the same files)") from None
    if as_json:
        _emit_json(json.dumps(summary, sort_keys=True))
        return
    typer.echo(f"synthetic market, seed {seed}, {summary['start']} + {duration} -> {catalog} "
               f"({summary['seconds']:.1f} s)")
    for symbol, info in summary["symbols"].items():
        typer.echo(f"  {symbol}: {info['events']:,} events, {info['trades']:,} trades, days {', '.join(info['days'])}")
    for r in summary["raw"]:
        typer.echo(f"  {r['format']}: {', '.join(r['files'])} (tick {r['tick_size']:g}, lot {r['lot_size']:g})")


@app.command(kept="the runs finished before the stop are recorded in --out; rerun it with --resume to run the rest")
def batch(
    batch_file: Annotated[Path, typer.Argument(help="Batch YAML: a base strategy and a matrix.")],
    catalog: YamlCatalogOpt = None,
    set_: SetOpt = None,
    workers: Annotated[int, typer.Option("--workers", help="Parallel worker processes (or Ray actors).")] = 1,
    executor: Annotated[str, typer.Option("--executor", help="local (process pool) or ray.")] = "local",
    address: Annotated[
        str | None, typer.Option("--address", help="Ray cluster address (e.g. ray://head:10001 or auto).")
    ] = None,
    out: Annotated[Path, typer.Option("--out", help="Result store folder.")] = Path("batch-results"),
    resume: Annotated[bool, typer.Option("--resume", help="Skip runs already done in --out.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the final counts as one JSON object.")] = False,
) -> None:
    """Run a strategy over a matrix of venues, symbols, dates and parameters, in parallel and resumably."""
    import json

    from quotelab import batch as batch_mod
    from quotelab.outputs import check_output_dir

    check_output_dir(out)
    summary = batch_mod.run_batch(batch_file, out, catalog=catalog, overrides=set_ or [], workers=workers,
                                  executor=executor, address=address, resume=resume,
                                  progress=batch_mod.failures_progress if as_json else batch_mod.default_progress())
    if as_json:
        _emit_json(json.dumps(summary.as_dict(), sort_keys=True))
    if summary.failed:
        raise typer.Exit(1)


@app.command(kept=OUT_AT_END)
def report(
    results_dir: Annotated[Path, typer.Argument(help="A `quotelab batch` --out folder, or one run's `quotelab run` "
                                                     "--out folder.")],
    out: Annotated[Path | None, typer.Option("--out", help="Report folder (default RESULTS_DIR/report).")] = None,
    stat: Annotated[str | None, typer.Option(
        "--stat", help="Stat to rank, colour and compare by (default pnl_usd: unit-free across venues).")] = None,
    x: Annotated[str | None, typer.Option("--x", help="Heatmap x parameter path.")] = None,
    y: Annotated[str | None, typer.Option("--y", help="Heatmap y parameter path.")] = None,
) -> None:
    """Write a static HTML report of batch results (summary, charts, failures, runs table) or of one run
    (PnL and its parts over time, position, quotes and fills, the per-day table)."""
    from quotelab.batch.report import build_report, build_run_report
    from quotelab.outputs import check_output_dir

    check_output_dir(out)
    if (results_dir / "summary.json").exists() and not (results_dir / "runs").exists():
        path = build_run_report(results_dir, out=out)
    else:
        unreadable: list[str] = []
        path = build_report(results_dir, out=out, stat=stat, x=x, y=y, unreadable=unreadable)
        for line in unreadable:
            typer.secho(f"warning: run record left out, cannot be read: {line}", fg=typer.colors.YELLOW, err=True)
    typer.echo(f"report: {path}")


@app.command(kept="nothing was written to the catalog")
def convert(
    files: Annotated[list[Path], typer.Argument(help="Raw capture files of one symbol, in time order.")],
    fmt: Annotated[str, typer.Option("--format", help="Input format, e.g. binance-usdm, binance-cm, binance-spot.")],
    symbol: Annotated[str, typer.Option("--symbol", help="Symbol as the venue names it, e.g. BTCUSDT.")],
    catalog: CatalogOpt,
    tick_size: Annotated[
        float | None, typer.Option("--tick-size", help="Price tick; required for symbols without a built-in spec.")
    ] = None,
    lot_size: Annotated[
        float | None, typer.Option("--lot-size", help="Quantity step; required for symbols without a built-in spec.")
    ] = None,
    compression: CompressionOpt = "deflate",
    contract: Annotated[
        str | None, typer.Option("--contract", help="linear or inverse; overrides the built-in spec.")
    ] = None,
    contract_size: Annotated[
        float | None,
        typer.Option("--contract-size", help="Coin per contract (linear, e.g. 0.01 for OKX BTC-USDT-SWAP) or "
                                             "quote currency per contract (inverse)."),
    ] = None,
    replace: Annotated[bool, typer.Option(
        "--replace", help="Replace a catalog day even with one covering less of it (without it, such a convert "
                          "is refused and writes nothing).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as one JSON object.")] = False,
) -> None:
    """Convert raw captures into catalog days (one npz per UTC day) and report the data's quality."""
    from quotelab import progress
    from quotelab.data.convert import convert_files, render_summary

    summary = convert_files(fmt, files, symbol, catalog, tick_size=tick_size, lot_size=lot_size,
                            compression=compression, contract=contract, contract_size=contract_size,
                            progress=progress.wanted(as_json), replace=replace)
    if as_json:
        _print_json(summary)
    else:
        render_summary(summary)


@app.command("train", kept=OUT_AT_END)
def train_cmd(
    config: Annotated[Path, typer.Argument(help="Training YAML (data, grid, features, target, model, validation).")],
    catalog: YamlCatalogOpt = None,
    set_: SetOpt = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Folder for report.json, folds/transfer CSV, model.json, forecast.yaml."),
    ] = None,
    strict: Annotated[bool, typer.Option(
        "--strict", help="Refuse to score a model file on its own training days (in-sample).")] = False,
    json_: Annotated[bool, typer.Option("--json", help="Print the report as one JSON object.")] = False,
) -> None:
    """Record features from signal kernels, fit a forecast walk-forward, score transfer, export it."""
    from quotelab import progress
    from quotelab.outputs import check_output_dir
    from quotelab.research.train import run_train

    check_output_dir(out)
    progress.enable(progress.wanted(json_))
    result = run_train(config, catalog=catalog, out_dir=out, strict=strict, overrides=set_ or [])
    rep = result.report
    if json_:
        _print_json(rep)
        return
    from rich.console import Console
    from rich.table import Table

    def f(v: object) -> str:
        return f"{v:.4f}" if isinstance(v, float) else ("" if v is None else str(v))

    console = Console()
    folds = Table(title=f"{rep['name']}: {rep['model']} model of the {rep['horizon_s']:g}s return of {rep['quote']}, "
                  f"purge {rep['purge_s']:g}s")
    for col in ("fold", "n_train", "n_test", "is_r2", "oos_r2", "is_ic", "oos_ic"):
        folds.add_column(col, justify="right")
    for r in rep.get("folds", []):
        folds.add_row(*(f(r.get(c)) for c in ("fold", "n_train", "n_test", "is_r2", "oos_r2", "is_ic", "oos_ic")))
    o = rep["overall"]
    folds.add_row("all", f(o.get("n")), f(o.get("n_oos")), f(o.get("is_r2")), f(o.get("oos_r2")), f(o.get("is_ic")),
                  f(o.get("oos_ic")))
    console.print(folds)
    if o.get("oos_ic_fold_mean") is not None:
        typer.echo(f"out-of-sample IC per fold: mean {f(o['oos_ic_fold_mean'])} ± {f(o.get('oos_ic_fold_std'))} "
                   f"(std over folds); 'all' ranks the test blocks pooled, each demeaned first")
    if o.get("coef"):
        coef = Table(title="coefficients (fit on all samples)")
        coef.add_column("feature")
        coef.add_column("coefficient", justify="right")
        for k, v in o["coef"].items():
            coef.add_row(k, f"{v:.6g}")
        console.print(coef)
    if rep.get("transfer"):
        tr = Table(title="out-of-sample: transfer vs native")
        for col in ("dataset", "asset", "n", "native_oos_r2", "transfer_r2", "native_oos_ic", "transfer_ic"):
            tr.add_column(col, justify="left" if col in ("dataset", "asset") else "right")
        for r in rep["transfer"]:
            tr.add_row(*(f(r.get(c)) for c in ("dataset", "asset", "n", "native_oos_r2", "transfer_r2",
                                                 "native_oos_ic", "transfer_ic")))
        console.print(tr)
    if result.out_dir is not None:
        typer.echo(f"results written to {result.out_dir}")


microprice_app = _Verbs(help="Stoikov's micro-price: fit g*(imbalance, spread) tables for the microprice "
                             "fair value.", no_args_is_help=True)
microprice_app.prefix = "microprice "
app.add_typer(microprice_app, name="microprice")


@microprice_app.command("fit", kept=OUT_AT_END)
def microprice_fit(
    catalog: CatalogOpt,
    venue: Annotated[str, typer.Option("--venue", help="Catalog venue, e.g. binance-usdm.")],
    symbol: Annotated[str, typer.Option("--symbol", help="Catalog symbol, e.g. BTCUSDT.")],
    dates: Annotated[str, typer.Option("--dates", help="Training days, YYYYMMDD, comma-separated.")],
    out: Annotated[Path, typer.Option("--out", help="Table file to write (.json or .npz).")],
    buckets: Annotated[int, typer.Option("--buckets", help="Imbalance buckets over [-1, 1].")] = 10,
    spreads: Annotated[int, typer.Option("--spreads", help="Spread buckets: 1, 2, ..., >=N ticks.")] = 2,
    step: Annotated[str, typer.Option("--step", help="Grid step, as the strategy's engine.step.")] = "100ms",
    edges: Annotated[str, typer.Option("--edges", help="uniform (equal width) or quantile (equal counts).")] = (
        "uniform"),
    horizon: Annotated[int, typer.Option("--horizon", help="Grid steps between the two ends of a transition.")] = 1,
    max_move: Annotated[
        float | None, typer.Option("--max-move", help="Drop transitions whose mid moved more (ticks); default: none.")
    ] = None,
    json_: Annotated[bool, typer.Option("--json", help="Print the table as one JSON object.")] = False,
) -> None:
    """Fit g*(imbalance bucket, spread bucket) on catalog days replayed on the engine's grid; write the table."""
    from quotelab.errors import ConfigError
    from quotelab.outputs import check_output_file
    from quotelab.research.microprice import fit_catalog
    from quotelab.units import step_option

    step_s = step_option(step)
    if out.suffix not in (".json", ".npz"):
        raise ConfigError(f"--out {out}: the table file's name must end in .json or .npz")
    check_output_file(out)
    table = fit_catalog(catalog, venue, symbol, [d.strip() for d in dates.split(",") if d.strip()], step=step_s,
                        n_buckets=buckets, n_spreads=spreads, edges=edges, horizon=horizon, max_move_ticks=max_move)
    table.save(out)
    if json_:
        _print_json(table.to_dict())
        return
    from rich.console import Console
    from rich.table import Table

    e = table.imbalance_edges
    t = Table(title=f"g* in ticks of {table.tick_size:g}: {venue}/{symbol} {dates}, "
              f"{table.training['transitions']} transitions, {table.iterations} iterations")
    t.add_column("imbalance")
    for j in range(table.n_spreads):
        t.add_column(f"spread {j + 1}{'+' if j == table.n_spreads - 1 else ''} (n)", justify="right")
    for b in range(table.n_buckets):
        t.add_row(f"[{e[b]:+.2f}, {e[b + 1]:+.2f})", *(f"{table.g_ticks[b, j]:+.3f} ({int(table.counts[b, j])})"
                                                     for j in range(table.n_spreads)))
    Console().print(t)
    typer.echo(f"wrote {out}")


@app.command("optimize", kept="the runs finished before the stop are recorded in --out; the same "
             "command resumes")
def optimize_cmd(
    opt_file: Annotated[Path, typer.Argument(help="Optimisation YAML: base strategy, space, objective, days.")],
    out: Annotated[Path, typer.Option("--out", help="Folder: optuna.db, runs/, trials.parquet, best.yaml.")],
    catalog: YamlCatalogOpt = None,
    set_: SetOpt = None,
    workers: Annotated[int, typer.Option("--workers", help="Parallel worker processes (or Ray actors).")] = 1,
    executor: Annotated[str, typer.Option("--executor", help="local (process pool) or ray.")] = "local",
    address: Annotated[str | None, typer.Option("--address", help="Ray cluster address.")] = None,
    trials: Annotated[int | None, typer.Option("--trials", help="Trials per fold (default: the file's).")] = None,
    json_: Annotated[bool, typer.Option("--json", help="Print the folds as JSON.")] = False,
) -> None:
    """Search strategy parameters with Optuna, walk-forward; resumes from OUT/optuna.db when run again."""
    from quotelab.batch.optimize import optimize
    from quotelab.outputs import check_output_dir

    check_output_dir(out)
    res = optimize(opt_file, out, catalog=catalog, overrides=set_ or [], workers=workers, executor=executor,
                   address=address, trials=trials, progress=(lambda m: None) if json_ else typer.echo,
                   failures=(lambda m: typer.echo(m, err=True)) if json_ else None)
    if json_:
        _print_json({"folds": res.folds, "best_yaml": str(res.best_yaml), "runs_done": res.runs_done,
                     "runs_reused": res.runs_reused, "seconds": round(res.seconds, 3)})
        return
    for f in res.folds:
        oos = f.get("oos_value")
        typer.echo(f"fold {f['fold']}: train {','.join(f['train'])} -> {f['params']}  in-sample {f['is_value']:.6g}"
                   + (f"  out-of-sample ({','.join(f['test'])}) {oos:.6g}" if oos is not None else ""))
    typer.echo(f"best strategy: {res.best_yaml}; trials: {out / 'trials.parquet'}; "
               f"{res.runs_done} runs, {res.runs_reused} reused, {res.seconds:.1f} s")


@app.command("calibrate", kept=OUT_AT_END)
def calibrate_cmd(
    catalog: CatalogOpt,
    asset: Annotated[list[str], typer.Option("--asset", help="VENUE/SYMBOL, e.g. binance-usdm/BTCUSDT; repeat.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the table, the plots and params.yaml.")],
    dates: Annotated[
        str | None, typer.Option("--dates", help="Days, YYYYMMDD, comma-separated (default: all in the catalog).")
    ] = None,
    step: Annotated[str, typer.Option("--step", help="Quoting step, as the strategy's engine.step.")] = "100ms",
    max_ticks: Annotated[int, typer.Option("--max-ticks", help="Fit λ(δ) at δ = 0.5, 1, ..., this many ticks.")] = 35,
    json_: Annotated[bool, typer.Option("--json", help="Print the table as JSON rows.")] = False,
) -> None:
    """Fit σ and the trade-arrival law λ(δ) = A·exp(−kδ) per asset and day (for avellaneda_stoikov, glft)."""
    from quotelab.outputs import check_output_dir
    from quotelab.research.calibrate import calibrate, write
    from quotelab.units import step_option

    step_s = step_option(step)
    check_output_dir(out)
    days = [d.strip() for d in dates.split(",") if d.strip()] if dates else None
    result = calibrate(catalog, asset, days, step=step_s, max_ticks=max_ticks)
    written = write(result, out)
    if json_:
        _print_json(result.rows)
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"λ(δ) = A·exp(−kδ), δ = 0.5..{max_ticks} ticks; σ in ticks/√s; step {step_s:g} s")
    for col in ("asset", "day", "side", "A (1/s)", "k (1/tick)", "R²", "points", "σ", "steps"):
        t.add_column(col, justify="right" if col not in ("asset", "day", "side") else "left")
    for r in result.rows:
        t.add_row(r["asset"], r["day"], r["side"], f"{r['A']:.4g}", f"{r['k']:.4g}", f"{r['r2']:.3f}",
                  str(r["points"]), f"{r['sigma']:.4g}", f"{r['steps']:,}")
    Console().print(t)
    typer.echo(f"wrote {len(written)} files to {out} (params block: {out / 'params.yaml'})")


@app.command("new-plugin", kept="the plugin folder may hold some of its files: delete it and run "
             "new-plugin again")
def new_plugin_cmd(
    name: Annotated[str, typer.Argument(help="Signal name, snake_case (e.g. trade_burst); also names the package.")],
    dir_: Annotated[
        Path | None, typer.Option("--dir", help="Folder to create (default: ./quotelab-NAME, hyphenated).")
    ] = None,
) -> None:
    """Scaffold an installable signal plugin: entry point, params, kernel, Python twin, reference test, strategy."""
    from quotelab.scaffold import scaffold

    created = scaffold(name, dir_)
    typer.echo(f"created {created.root}")
    for path in created.files:
        typer.echo(f"  {path.relative_to(created.root)}")
    typer.echo(f"next: pip install -e {created.root} && python -m pytest {created.root / 'tests'}; "
               f"see docs/writing-plugins.md")


@app.command("check-plugin", kept="it writes nothing")
def check_plugin_cmd(
    name: Annotated[str, typer.Argument(help="Signal registered both as a kernel and as a Python function.")],
    catalog: CatalogOpt,
    venue: Annotated[str, typer.Option("--venue", help="Venue in the catalog.")] = "binance-usdm",
    symbol: Annotated[str, typer.Option("--symbol", help="Symbol in the catalog.")] = "BTCUSDT",
    date: Annotated[
        list[str] | None, typer.Option("--date", help="Day YYYYMMDD (repeatable; default: every day of the symbol).")
    ] = None,
    params: Annotated[
        str, typer.Option("--params", help='Params of both versions as JSON, e.g. \'{"alpha": 0.2}\'.')
    ] = "{}",
    step: Annotated[str, typer.Option("--step", help="Grid step, e.g. 100ms or 1s.")] = "100ms",
    rtol: Annotated[float, typer.Option("--rtol", help="Relative tolerance.")] = 1e-9,
    atol: Annotated[float, typer.Option("--atol", help="Absolute tolerance.")] = 1e-12,
    plugin: Annotated[
        list[Path] | None, typer.Option("--plugin", help="Also load this local plugin file (repeatable).")
    ] = None,
    with_: Annotated[
        list[str] | None, typer.Option(
            "--with", help="Another asset the signal reads, NAME=VENUE:SYMBOL (repeatable; same days), "
                           "e.g. spot=binance-spot:BTCUSDT; params name it as NAME.")
    ] = None,
    json_: Annotated[bool, typer.Option("--json", help="Print the result as one JSON object.")] = False,
) -> None:
    """Replay real data through a signal's Python function and its kernel side by side; report the first
    step where they differ (exit code 1), or that they agree at every step. The asset of --venue and
    --symbol is `quoted`; --with adds the others a cross-asset signal reads."""
    import json

    from quotelab.data import catalog as cat
    from quotelab.errors import ConfigError
    from quotelab.research.signal_check import catalog_asset, check_signal
    from quotelab.strategy.registry import load_registry
    from quotelab.units import step_option

    try:
        raw = json.loads(params)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--params {params!r}: not JSON ({exc.msg}); e.g. --params '{{\"alpha\": 0.2}}'") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--params {params!r}: expected a JSON object of param names and values")
    step_s = step_option(step)
    others = []
    for spec in with_ or []:
        other, _, source = spec.partition("=")
        other_venue, _, other_symbol = source.partition(":")
        if not (other.isidentifier() and other_venue and other_symbol):
            raise ConfigError(f"--with {spec!r}: expected NAME=VENUE:SYMBOL, e.g. spot=binance-spot:BTCUSDT")
        if other == "quoted" or other in [o[0] for o in others]:
            raise ConfigError(f"--with {spec!r}: the name {other!r} is taken; give each asset its own name")
        others.append((other, other_venue, other_symbol))
    registry = load_registry(local_files=plugin or [])
    days = date or cat.list_days(catalog, venue, symbol)
    assets = [catalog_asset(catalog, venue, symbol, days),
              *(catalog_asset(catalog, v, s, days, name=n) for n, v, s in others)]
    res = check_signal(registry, name, assets, raw, step=step_s, rtol=rtol, atol=atol)
    market = f"{venue}/{symbol}" + "".join(f", {n}={v}/{s}" for n, v, s in others)
    d = res.first_difference
    if json_:
        _print_json({"name": name, "steps": res.steps, "n_different": res.n_different,
                     "max_abs_diff": res.max_abs_diff,
                     "first_difference": None if d is None else {
                         "step": d.step, "timestamp_ns": d.timestamp_ns, "time_utc": d.time_utc,
                         "kernel": d.kernel, "python": d.python}})
    elif d is None:
        typer.echo(f"{name}: kernel and python agree at all {res.steps} steps of {market} "
                   f"(max |diff| {res.max_abs_diff:.3g}, rtol {rtol:g}, atol {atol:g})")
    else:
        typer.echo(f"{name}: first difference at step {d.step} of {res.steps}, timestamp {d.timestamp_ns} "
                   f"({d.time_utc}): kernel {d.kernel!r}, python {d.python!r}; "
                   f"{res.n_different} steps differ beyond rtol {rtol:g}, atol {atol:g}")
    if d is not None:
        raise typer.Exit(1)


DEBUG_ENV = "QUOTELAB_DEBUG"


def _write_traceback(exc: BaseException) -> Path:
    import tempfile

    fd, name = tempfile.mkstemp(prefix="quotelab-traceback-", suffix=".txt")
    with os.fdopen(fd, "w") as fh:
        fh.write(f"quotelab {__version__}: {' '.join(sys.argv)}\n\n")
        fh.write("".join(traceback.format_exception(exc)))
    return Path(name)


def main() -> None:
    """The one place errors end: a known error is one line (exit 2); anything else is a one-line summary
    and the file holding its traceback (exit 1). ``--debug`` (or QUOTELAB_DEBUG=1) prints the traceback."""
    args = sys.argv[1:]
    cut = args.index("--") if "--" in args else len(args)
    debug = "--debug" in args[:cut] or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    args = [a for a in args[:cut] if a != "--debug"] + args[cut:]
    from quotelab.stopping import raising

    try:
        with raising():  # Ctrl-C and SIGTERM raise, and each verb says what it kept (_Verbs)
            app(args=args, prog_name="quotelab")
    except QuotelabError as exc:
        # A plugin's own exception wrapped in a PluginError is a bug in that plugin: keep its traceback.
        inner = isinstance(exc, PluginError) and exc.__cause__ is not None
        if debug:
            traceback.print_exception(exc)
        message = f"error: {exc}"
        if inner and not debug:
            message += f" (traceback: {_write_traceback(exc)})"
        typer.secho(message, fg=typer.colors.RED, err=True)
        sys.exit(128 + exc.signum if isinstance(exc, Stopped) else 2)
    except Exception as exc:
        if debug:
            traceback.print_exception(exc)
        summary = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        message = f"error: unexpected {type(exc).__name__}" + (f": {summary}" if summary else "")
        if not debug:
            message += f"; the full traceback is in {_write_traceback(exc)} (rerun with --debug to print it)"
        typer.secho(message, fg=typer.colors.RED, err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
