"""`ddpo label ...` and `ddpo preference ...`: the label store people fill (pairwise choices) and the preference
model trained on it (`ddpo.preference`)."""

from __future__ import annotations

from pathlib import Path

import click

from .errors import UserError
from .utils import quiet_libraries as _quiet_libraries


def _label_errors() -> tuple[type[BaseException], ...]:
    from .preference.store import LabelStoreError

    return (LabelStoreError, FileNotFoundError)


def _open_store(path: str, *, must_exist: bool = True):
    from .preference.store import LabelStore

    if must_exist and not Path(path).is_file():
        raise UserError(f"no label store at {path}; create it with `ddpo label add-labeller {path} NAME` or `ddpo label add-pairs {path} ...`")
    try:
        return LabelStore(path)
    except _label_errors() as error:
        raise UserError(str(error)) from error


@click.group()
def label() -> None:
    """People in the loop: a labelling web app over a label store (SQLite), its labellers, pairs and labels."""


@label.command("serve")
@click.argument("store", type=click.Path())
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind; other than loopback, put it behind TLS.")
@click.option("--port", default=8766, show_default=True, type=int)
@click.option("--select", "strategy", help="random, uncertainty or bald: re-choose the queue while serving, as `ddpo label select` does (default: no selection).")
@click.option("--reselect-every", default=25, show_default=True, type=int, help="With --select: re-choose after this many new labels.")
def label_serve(store: str, host: str, port: int, strategy: str | None, reselect_every: int) -> None:
    """Serve the labelling page: a prompt, two images, keys 1 / 2 / t (tie) / s (skip) / u (undo)."""
    if reselect_every < 1:
        raise UserError(f"--reselect-every must be at least 1; got {reselect_every}")
    if strategy is not None and strategy not in ("random", "uncertainty", "bald"):
        raise UserError(f"--select {strategy!r} is not one of random, uncertainty, bald")
    try:
        from .server.label_app import serve
    except ImportError as error:
        raise UserError(f"the labelling app needs FastAPI and uvicorn: pip install 'ddpo[label]' ({error})") from error
    opened = _open_store(store)
    progress, labellers = opened.progress(), opened.labellers()
    opened.close()
    if host not in ("127.0.0.1", "localhost", "::1"):
        click.echo(f"ddpo label: warning: binding {host}: tokens and labels travel unencrypted; put the app behind TLS", err=True)
    hint = "" if labellers else f"; no labellers yet: `ddpo label add-labeller {store} NAME`"
    click.echo(f"ddpo label: {store} ({progress['pairs']} pairs, {sum(progress['labels_per_labeller'].values())} labels) on http://{host}:{port}/{hint}", err=True)
    if strategy is not None:
        _start_reselection(store, strategy, reselect_every)
    serve(store, host, port)


def _start_reselection(store: str, strategy: str, every: int):
    """A daemon thread that re-chooses the app's queue (`queue_for_store`) whenever `every` new labels came in;
    returns the event that stops it."""
    import threading

    from .preference.active import queue_for_store

    def loop() -> None:
        opened = _open_store(store)
        done = -every  # choose once at the start
        while not stop.is_set():
            labels = len(opened.labels())
            if labels - done >= every and opened.unlabelled_pairs():
                try:
                    reply = queue_for_store(opened, strategy)
                    click.echo(f"ddpo label: queue re-chosen after {labels} labels: {reply['active']} active, {reply['random']} random", err=True)
                except Exception as error:  # noqa: BLE001 - the app keeps serving the last queue
                    click.echo(f"ddpo label: warning: re-choosing the queue failed ({error}); keeping the last one", err=True)
                done = labels
            stop.wait(2.0)
        opened.close()

    stop = threading.Event()
    threading.Thread(target=loop, name="label-reselect", daemon=True).start()
    return stop


@label.command("add-labeller")
@click.argument("store", type=click.Path())
@click.argument("name")
@click.option("--replace", is_flag=True, help="Give an existing labeller a new token (the old one stops working).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Host of the link printed.")
@click.option("--port", default=8766, show_default=True, type=int, help="Port of the link printed.")
def label_add_labeller(store: str, name: str, replace: bool, host: str, port: int) -> None:
    """Create a labeller (and the store if new); prints their private link, which carries their token."""
    try:
        token = _open_store(store, must_exist=False).add_labeller(name, replace=replace)
    except _label_errors() as error:
        raise UserError(str(error)) from error
    click.echo(f"http://{host}:{port}/#token={token}")


@label.command("add-pairs")
@click.argument("store", type=click.Path())
@click.option("--run", "run_dir", type=click.Path(file_okay=False), help="A run directory: same-prompt pairs from its sample grid.")
@click.option("--epoch", type=int, help="With --run: the grid of this epoch (default: the last).")
@click.option("--file", "pairs_file", type=click.Path(dir_okay=False), help='JSONL, one {"prompt", "image_a", "image_b"} per line.')
def label_add_pairs(store: str, run_dir: str | None, epoch: int | None, pairs_file: str | None) -> None:
    """Queue pairs to label, from a run's sample grid or from a file."""
    from .preference.pairs import pairs_from_file, pairs_from_run

    if (run_dir is None) == (pairs_file is None):
        raise UserError("give exactly one of --run RUN_DIR and --file PAIRS.jsonl")
    try:
        pairs, metadata = pairs_from_run(run_dir, epoch) if run_dir else pairs_from_file(pairs_file)
        ids = _open_store(store, must_exist=False).add_pairs(pairs, source=f"run:{run_dir}" if run_dir else f"file:{pairs_file}", metadata=metadata)
    except _label_errors() as error:
        raise UserError(str(error)) from error
    click.echo(f"{len(ids)} pairs in {store}")


@label.command("export")
@click.argument("store", type=click.Path())
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--no-images", is_flag=True, help="Leave the PNGs out (the importing store must already hold them).")
def label_export(store: str, out: str, no_images: bool) -> None:
    """Write every label as one JSON line (labeller, choice, time, prompt, image hashes and PNGs)."""
    try:
        count = _open_store(store).export_jsonl(out, images=not no_images)
    except _label_errors() as error:
        raise UserError(str(error)) from error
    click.echo(f"{count} labels -> {out}")


@label.command("import")
@click.argument("store", type=click.Path())
@click.argument("jsonl", type=click.Path(dir_okay=False))
def label_import(store: str, jsonl: str) -> None:
    """Merge the labels of an export into STORE (created if new); labels already there are not duplicated."""
    import json

    try:
        counts = _open_store(store, must_exist=False).import_jsonl(jsonl)
    except _label_errors() as error:
        raise UserError(str(error)) from error
    click.echo(json.dumps(counts))


@label.command("status")
@click.argument("store", type=click.Path())
@click.option("--model", "model_path", type=click.Path(dir_okay=False), help="A preference model: also each labeller's agreement with it.")
def label_status(store: str, model_path: str | None) -> None:
    """Pairs, labels per labeller, and each labeller's agreement with the others' majority (and with --model);
    a labeller whose agreement is at chance is flagged (JSON; a warning line on stderr)."""
    import json

    from .preference.agreement import labeller_agreement, model_margins

    opened = _open_store(store)
    margins = None
    if model_path is not None:
        _quiet_libraries()
        from .preference.model import PreferenceModelError

        try:
            margins = model_margins(opened, model_path)
        except (PreferenceModelError, *_label_errors()) as error:
            raise UserError(str(error)) from error
    agreement = labeller_agreement(opened.labels(), margins)
    click.echo(json.dumps({**opened.progress(), "labellers": [a.as_dict() for a in agreement]}, indent=2))
    for flagged in (a for a in agreement if a.at_chance):
        majority = flagged.judged_against == "majority"
        reference, share = ("the others' majority", flagged.majority_agreement) if majority else ("the preference model", flagged.model_agreement)
        click.echo(f"ddpo label: warning: {flagged.labeller} agrees with {reference} on {share:.0%} of their answers: at chance; check their labels before training on them", err=True)


@label.command("select")
@click.argument("store", type=click.Path())
@click.option("--strategy", default="bald", show_default=True, help="random, uncertainty or bald: at random, or what the preference model is least sure of.")
@click.option("--count", default=100, show_default=True, type=int, help="Pairs to queue (the rest keep their order behind them).")
@click.option("--random-share", default=0.2, show_default=True, type=float, help="Share of the queue drawn at random (held-out material: `ddpo preference train --heldout-random-only`).")
@click.option("--features", default="shapes-describer", show_default=True, help="'shapes-describer' or 'clip:MODEL'.")
@click.option("--l2", default=3e-2, show_default=True, type=float)
@click.option("--seed", default=0, show_default=True, type=int)
def label_select(store: str, strategy: str, count: int, random_share: float, features: str, l2: float, seed: int) -> None:
    """Choose which unlabelled pairs the app shows next: fit a preference model on the labels so far and queue the
    pairs whose answers would teach it most (active selection), with a share drawn at random. Run it again as
    labels come in; the app (which may be serving) follows the new order at once."""
    _quiet_libraries()
    import json

    from .preference.active import queue_for_store
    from .preference.model import PreferenceModelError

    try:
        reply = queue_for_store(_open_store(store), strategy, count, random_share=random_share, features=features, l2=l2, seed=seed)
    except (PreferenceModelError, ValueError, *_label_errors()) as error:
        raise UserError(str(error)) from error
    click.echo(json.dumps(reply))


@click.group()
def preference() -> None:
    """Preference models learned from labels (Bradley-Terry), usable as reward `preference:PATH`."""


@preference.command("train")
@click.argument("store", type=click.Path())
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Where to write the model (.safetensors).")
@click.option("--features", default="shapes-describer", show_default=True, help="'shapes-describer' or 'clip:MODEL' (hub id or directory).")
@click.option("--heldout", default=0.2, show_default=True, type=float, help="Fraction of pairs held out to measure pairwise accuracy.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--l2", default=3e-2, show_default=True, type=float, help="L2 penalty on the weights (more: less confident, less overfit).")
@click.option("--ties", default="half", show_default=True, help="half or davidson: a tie as a target of 1/2, or as Davidson's third outcome.")
@click.option("--heldout-random-only", is_flag=True, help="Hold out only pairs `ddpo label select` drew at random (unbiased under active selection).")
def preference_train(store: str, out: str, features: str, heldout: float, seed: int, l2: float, ties: str, heldout_random_only: bool) -> None:
    """Fit a Bradley-Terry model on STORE's labels; prints the held-out pairwise accuracy (JSON)."""
    _quiet_libraries()
    import json
    from dataclasses import asdict

    from .preference.model import PreferenceModelError, save_preference_model, train_preference_model

    try:
        opened = _open_store(store)
        candidates = {pair for pair, selection in opened.selections().items() if selection == "random"} if heldout_random_only else None
        model, _, report = train_preference_model(opened.comparisons(), features, heldout_fraction=heldout, seed=seed, l2=l2, ties=ties, heldout_candidates=candidates)
        save_preference_model(model, report, out)
    except (PreferenceModelError, ValueError, *_label_errors()) as error:
        raise UserError(str(error)) from error
    click.echo(json.dumps({"model": out, "reward": f"preference:{out}", **asdict(report)}, indent=2))
