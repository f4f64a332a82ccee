"""Prefect UI artifacts: a table per round and the final best, as a watcher.

Keys are derived from the run, not the flow run: ``autofinetune-<name>-round-<k>`` and
``autofinetune-<name>-best``, where ``<name>`` is the output dir's name, or for a dated
run dir (``output_<YYYYmmddHHMMSS>``, as scheduled runs write under their output root)
the root's name. So every night's run of one scheduled search adds a version to the same
artifacts, and the UI shows how the best score moved from night to night.
"""

from __future__ import annotations

import re
from pathlib import Path

from runtime.trial import outcome_counts

__all__ = ["artifact_key_base", "round_table", "best_markdown", "PrefectArtifacts"]

_DATED = re.compile(r"^output_\d{14}$")


def artifact_key_base(output_dir: str | Path) -> str:
    path = Path(output_dir)
    name = path.parent.name if _DATED.match(path.name) else path.name
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "run"
    return f"autofinetune-{slug}"


def round_table(records: list[dict], names: list[str]) -> list[dict]:
    """One row per candidate: hyperparameters, score, outcome, slot/GPU, duration, parent, and in
    a round with trials stopped early, ``stopped_at``: the step and value each last reported."""
    any_pruned = any(r["outcome"] == "pruned" for r in records)
    rows = []
    for r in records:
        row = {"candidate": r["candidate"]}
        row.update({name: r["params"][name] for name in names})
        row.update({
            "score": r["score"] if r["outcome"] == "ok" else None,
            "outcome": r["outcome"],
            "slot": r.get("slot"),
            "gpu": r.get("gpu") if r.get("gpu") is not None else "cpu",
            "duration_s": r.get("duration_s"),
            "parent": r.get("parent") or "-",
        })
        if any_pruned:
            row["stopped_at"] = (f"step {r['curve'][-1][0]}: {r['curve'][-1][1]}"
                                 if r["outcome"] == "pruned" and r.get("curve") else "-")
        rows.append(row)
    return rows


def best_markdown(summary: dict, names: list[str]) -> str:
    if summary.get("best_score") is None:
        return f"# autofinetune: no trial produced a score\n\nRun dir: `{summary['output_dir']}`\n"
    lines = ["# autofinetune: the final best", "", "| hyperparameter | value |", "|---|---|"]
    lines += [f"| {name} | {summary['best_params'][name]} |" for name in names]
    trial = summary.get("best_trial", {})
    lines += ["", f"**Best eval score:** {summary['best_score']}",
              f"(round {trial.get('round')}, candidate {trial.get('candidate')})", "",
              f"**Best model:** `{summary['best_model']}`", "",
              f"Run dir: `{summary['output_dir']}`"]
    return "\n".join(lines) + "\n"


class PrefectArtifacts:
    """Watcher: creates the artifacts inside the round subflow and the top flow."""

    def __init__(self, *, output_dir: str, names: list[str]) -> None:
        self.key = artifact_key_base(output_dir)
        self.names = list(names)

    def round_finished(self, k: int, records: list[dict], best: dict | None) -> None:
        from prefect.artifacts import create_table_artifact

        counts = outcome_counts(records)
        create_table_artifact(
            key=f"{self.key}-round-{k}", table=round_table(records, self.names),
            description=f"autofinetune round {k}: every candidate, its outcome and its parent "
                        f"({counts['ok']} finished, {counts['pruned']} stopped early, {counts['failed']} failed)")

    def search_finished(self, summary: dict) -> None:
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(key=f"{self.key}-best", markdown=best_markdown(summary, self.names),
                                 description="autofinetune: best hyperparameters, score and model")
