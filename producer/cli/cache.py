"""`bgq cache stats|prune`: what the store holds, and its lifecycle."""

from __future__ import annotations

from typing import Annotated

import typer

from bgq import cache, contract
from bgq.contract import OUTCOMES, Counter
from bgq.errors import ConfigError
from bgq.settings import load_settings
from bgq.store import open_store
from bgq.units import format_size, parse_duration, parse_size
from producer.cli.common import handle_errors, shown_default

cache_app = typer.Typer(help="The result cache (the store).", no_args_is_help=True)


@cache_app.command("stats")
@handle_errors
def cache_stats() -> None:
    """Entries and bytes in the store, and the cluster's cache hit rate."""
    settings = load_settings()
    store = open_store(settings)
    stats = cache.store_stats(store)
    typer.echo(f"store:    {store.url}")
    typer.echo(f"results:  {stats.results} ({format_size(stats.result_bytes)})")
    typer.echo(f"masks:    {stats.masks} ({format_size(stats.mask_bytes)})")
    typer.echo(f"inputs:   {stats.inputs} ({format_size(stats.input_bytes)})")
    client = cache.cluster_redis(settings)
    if client is None:
        typer.echo("hit rate: unknown (no Redis running for this BGQ_HOME)")
        return
    with client:
        raw = client.hgetall(contract.STATS_KEY)
    counts = {k.decode(): int(v) for k, v in raw.items()}  # type: ignore[union-attr]
    hits, misses = counts.get(Counter.CACHE_HITS, 0), counts.get(Counter.CACHE_MISSES, 0)
    rate = f"{hits / (hits + misses):.1%}" if hits + misses else "n/a"
    typer.echo(f"hit rate: {rate} ({hits} hits, {misses} misses)")
    typer.echo("results:  " + ", ".join(f"{counts.get(k, 0)} {k}" for k in OUTCOMES))
    typer.echo(f"model runs: {counts.get(Counter.INFERENCES, 0)} (a mask serves every variant)")


@cache_app.command("prune")
@handle_errors
def cache_prune(
    max_age: Annotated[
        str | None,
        typer.Option(
            help="Drop results unused for this long, e.g. 7d "
            + shown_default("BGQ_CACHE_MAX_AGE")
            + "."
        ),
    ] = None,
    max_size: Annotated[
        str | None,
        typer.Option(
            help="Then drop the LRU ones down to this, e.g. 20G "
            + shown_default("BGQ_CACHE_MAX_SIZE")
            + "."
        ),
    ] = None,
    keep_inputs: Annotated[
        bool | None,
        typer.Option(
            "--keep-inputs/--drop-inputs",
            help=f"Keep input blobs {shown_default('BGQ_CACHE_KEEP_INPUTS')}.",
        ),
    ] = None,
    dry_run: Annotated[bool, typer.Option(help="Only report what would go.")] = False,
) -> None:
    """Delete least-recently-used results and masks (never in flight or used in the last minute)."""
    settings = load_settings()
    try:
        age = parse_duration(max_age) if max_age is not None else settings.cache_max_age
        size = parse_size(max_size) if max_size is not None else settings.cache_max_size
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    keep = settings.cache_keep_inputs if keep_inputs is None else keep_inputs
    client = cache.cluster_redis(settings)
    with cache.prune_lock(client) as held:
        if not held:
            raise ConfigError("another prune is running (lock bgq:prune-lock); try later")
        report = cache.prune(open_store(settings), client, age, size, keep, dry_run)
    if client is not None:
        client.close()
    verb = "would remove" if dry_run else "removed"
    typer.echo(
        f"{verb} {report.removed - report.masks_removed} result(s) and "
        f"{report.masks_removed} mask(s) ({format_size(report.removed_bytes)}), "
        f"{report.inputs_removed} input(s) ({format_size(report.inputs_removed_bytes)}), "
        f"{report.temporaries_removed} temporary file(s)"
    )
    typer.echo(
        f"kept {report.kept - report.masks_kept} result(s) and {report.masks_kept} mask(s) "
        f"({format_size(report.kept_bytes)}): "
        f"{report.skipped_recent} used in the last minute, {report.skipped_in_flight} in flight"
    )
    for note in report.notes:
        typer.echo(f"note: {note}")
