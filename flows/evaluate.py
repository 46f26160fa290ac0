"""Prefect flow `evaluate-and-promote`: move the champion alias only to a better version.

Wiring only; the work is in charlm.tracking:

    read-alias -> compare-versions (candidate vs champion, on the champion's dataset)
               -> decide (better by `margin` bits/char?) -> move-alias (only then) -> record-decision

The decision and both scores go to the flow log, a Prefect markdown artifact, a run in the MLflow
experiment `charlm-evaluations` and tags on the candidate version. With no champion yet the
candidate becomes champion without a comparison. If the alias moved while the comparison ran, the
flow does not overwrite it (decision 'stale').

Each evaluation also logs the candidate's `charlm visualize` page (charlm.tracking.visualize) to
the run of that version, as visualize/NAME-vN.html, and links it as a Prefect artifact; a page
that cannot be made is a warning, not a failed evaluation.

Tasks get the tracking URI only when the caller passed one; otherwise each resolves it from the
environment, so credentials in a URI never become Prefect parameters.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.cache_policies import NONE

from charlm import tracking
from charlm.errors import first_line
from flows.retries import retry_if_transient

DEFAULT_MARGIN = 0.01  # bits per character


@task(name="read-alias", cache_policy=NONE)
def read_alias(name: str, alias: str, tracking_uri: str | None, store: str | None) -> int | None:
    return tracking.alias_version(name, alias, tracking_uri=tracking_uri, store=store)


@task(name="resolve-candidate", cache_policy=NONE)
def resolve_candidate(name: str, candidate: str, tracking_uri: str | None, store: str | None) -> int:
    return tracking.resolve_version(name, candidate, tracking_uri=tracking_uri, store=store)


@task(
    name="compare-versions",
    cache_policy=NONE,
    retries=2,
    retry_delay_seconds=[2, 8],
    retry_condition_fn=retry_if_transient,
)
def compare_versions(
    name: str,
    versions: list[int],
    dataset: str | None,
    split: str,
    max_chars: int | None,
    tracking_uri: str | None,
    store: str | None,
) -> dict[str, Any]:
    return tracking.compare_versions(
        name,
        versions,
        dataset=dataset,
        split=split,
        max_chars=max_chars,
        tracking_uri=tracking_uri,
        store=store,
    )


@task(name="move-alias", cache_policy=NONE)
def move_alias(
    name: str,
    version: int,
    alias: str,
    expected: int | None,
    tracking_uri: str | None,
    store: str | None,
) -> dict[str, Any] | None:
    """Point alias at version if it still points at expected; None if it moved meanwhile."""
    now = tracking.alias_version(name, alias, tracking_uri=tracking_uri, store=store)
    if now != expected:
        return None
    return tracking.promote(name, version, alias=alias, tracking_uri=tracking_uri, store=store)


@task(name="visualize-version", cache_policy=NONE)
def visualize_version(
    name: str, version: int, dataset: str, split: str, tracking_uri: str | None, store: str | None
) -> dict[str, Any]:
    """The `charlm visualize` page of the version on the dataset's split, logged to its run."""
    from charlm.tracking.visualize import log_version_page

    return log_version_page(name, version, dataset, split=split, tracking_uri=tracking_uri, store=store)


@task(name="record-decision", cache_policy=NONE)
def record_decision(
    decision: dict[str, Any], comparison: dict[str, Any] | None, tracking_uri: str | None, store: str | None
) -> str:
    return tracking.log_evaluation(decision, comparison, tracking_uri=tracking_uri, store=store)


def decide(candidate_bpc: float | None, champion_bpc: float | None, margin: float) -> tuple[bool, str]:
    """(promote?, reason): the candidate must beat the champion by at least margin bits/char."""
    if candidate_bpc is None:
        return False, "the candidate could not be scored on the champion's dataset"
    if champion_bpc is None:
        return True, "the champion could not be scored on its own dataset"
    gain = champion_bpc - candidate_bpc
    if gain >= margin:
        return True, f"better by {gain:.4f} bpc (margin {margin:g})"
    return False, f"not better by the margin: {gain:+.4f} bpc (margin {margin:g})"


def describe(d: dict[str, Any]) -> str:
    """One line with the decision and the figures it rests on."""

    def bpc(x: float | None) -> str:
        return "not scored" if x is None else f"{x:.4f} bpc"

    champ = (
        f"no @{d['alias']} yet"
        if d.get("champion") is None
        else f"@{d['alias']} v{d['champion']} {bpc(d.get('champion_bpc'))}"
    )
    return (
        f"candidate v{d['candidate']} {bpc(d.get('candidate_bpc'))} vs {champ} "
        f"-> {d['decision']} ({d['reason']})"
    )


def _markdown(d: dict[str, Any]) -> str:
    def f(x: Any) -> str:
        return f"{x:.4f}" if isinstance(x, float) else ("-" if x is None else str(x))

    return "\n".join(
        [
            f"## {d['name']}: {d['decision']}",
            "",
            f"{d['reason']}",
            "",
            "| | version | bpc |",
            "|---|---:|---:|",
            f"| candidate | {f(d['candidate'])} | {f(d.get('candidate_bpc'))} |",
            f"| @{d['alias']} (before) | {f(d.get('champion'))} | {f(d.get('champion_bpc'))} |",
            "",
            f"dataset {f(d.get('dataset'))}, {d.get('split')} split, margin {d['margin']:g} bpc; "
            f"@{d['alias']} now -> version {f(d.get('alias_now'))}",
        ]
    )


@flow(name="evaluate-and-promote")
def evaluate_and_promote(
    name: str,
    candidate: str | int,
    alias: str = tracking.CHAMPION,
    margin: float = DEFAULT_MARGIN,
    dataset: str | None = None,
    split: str = "test",
    max_chars: int | None = None,
    tracking_uri: str | None = None,
    store: str | None = None,
) -> dict[str, Any]:
    """Compare version `candidate` of `name` with the version holding `alias` on that champion's
    dataset (or `dataset`) and move the alias to the candidate only when it is better by `margin`
    bits per character. Returns the decision with both scores."""
    log = get_run_logger()
    cand = resolve_candidate(name, str(candidate), tracking_uri, store)
    champ = read_alias(name, alias, tracking_uri, store)
    decision: dict[str, Any] = {
        "name": name,
        "candidate": cand,
        "champion": champ,
        "alias": alias,
        "margin": float(margin),
        "split": split,
        "dataset": dataset,
        "candidate_bpc": None,
        "champion_bpc": None,
        "improvement_bpc": None,
    }
    # The candidate is scored even with nothing to compare it with, so every decision states the
    # figures it rests on (the champion's too, where there is one).
    scored = [cand] if champ in (None, cand) else [champ, cand]
    comparison = compare_versions(name, scored, dataset, split, max_chars, tracking_uri, store)
    by_version = {r["version"]: r for r in comparison["results"]}
    decision["dataset"] = comparison["dataset"]
    decision["candidate_bpc"] = by_version[cand]["bpc"]
    if champ is not None:
        decision["champion_bpc"] = by_version[champ]["bpc"]
    if champ is None:
        promote_it, reason = True, f"no version holds @{alias} yet"
    elif champ == cand:
        promote_it, reason = False, f"version {cand} already holds @{alias}"
    else:
        if decision["candidate_bpc"] is not None and decision["champion_bpc"] is not None:
            decision["improvement_bpc"] = decision["champion_bpc"] - decision["candidate_bpc"]
        promote_it, reason = decide(decision["candidate_bpc"], decision["champion_bpc"], margin)
        if comparison["notes"]:
            reason += "; " + "; ".join(comparison["notes"])
    decision["alias_now"] = champ
    decision["page"] = _page(name, cand, comparison["dataset"], split, tracking_uri, store)
    if promote_it:
        moved = move_alias(name, cand, alias, champ, tracking_uri, store)
        if moved is None:
            now = read_alias(name, alias, tracking_uri, store)
            decision.update(decision="stale", promoted=False, alias_now=now)
            reason = f"@{alias} moved to version {now} during the evaluation; left as it is"
        else:
            decision.update(decision="promoted", promoted=True, alias_now=cand)
    else:
        decision.update(decision="kept", promoted=False)
    decision["reason"] = reason
    decision["evaluation_run_id"] = record_decision(decision, comparison, tracking_uri, store)
    log.info("%s: %s", name, describe(decision))
    create_markdown_artifact(
        key=f"evaluate-{_artifact_key(name)}",
        markdown=_markdown(decision),
        description=f"charlm evaluate-and-promote {name} v{cand}",
    )
    return decision


def _page(
    name: str, version: int, dataset: str, split: str, tracking_uri: str | None, store: str | None
) -> str | None:
    """The candidate's visualization page (an MLflow artifact of its run, and a Prefect link
    artifact); a page that cannot be made is a warning, never a failed evaluation."""
    log = get_run_logger()
    try:
        page = visualize_version(name, version, dataset, split, tracking_uri, store)
    except Exception as e:
        log.warning("%s v%s: no visualization page: %s", name, version, first_line(e))
        return None
    create_link_artifact(
        key=f"visualize-{_artifact_key(name)}",
        link=page["artifact_uri"],
        link_text=f"{name} v{version}: what it predicts and what its cells track",
        description=f"charlm visualize {name} v{version} on the {split} split of dataset {dataset}",
    )
    return page["artifact_uri"]


def _artifact_key(name: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    out = "".join(c if c.isalnum() else "-" for c in name.lower())
    return out.strip("-") or "model"
