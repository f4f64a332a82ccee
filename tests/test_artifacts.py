"""Prefect UI artifacts, read back from a real Prefect server through its client."""

import asyncio
import json

import pytest

from flows.cli import main
from flows.artifacts import artifact_key_base, best_markdown, round_table

pytestmark = pytest.mark.usefixtures("prefect_api", "lock_dir")


def test_key_base_is_shared_by_the_dated_runs_of_one_root():
    assert artifact_key_base("/runs/Nightly Digits/output_20261127020000") == "autofinetune-nightly-digits"
    assert artifact_key_base("/runs/Nightly Digits/output_20261128020000") == "autofinetune-nightly-digits"
    assert artifact_key_base("/tmp/my_run") == "autofinetune-my-run"


def test_round_table_rows():
    rec = {"candidate": 2, "params": {"x": 0.5, "n": 3}, "outcome": "crashed", "score": None,
           "slot": 1, "gpu": None, "duration_s": 1.25, "parent": "round0/model-1"}
    assert round_table([rec], ["x", "n"]) == [{
        "candidate": 2, "x": 0.5, "n": 3, "score": None, "outcome": "crashed", "slot": 1,
        "gpu": "cpu", "duration_s": 1.25, "parent": "round0/model-1"}]
    pruned = {**rec, "candidate": 3, "outcome": "pruned", "curve": [[1, 0.5], [3, 0.25]]}
    rows = round_table([rec, pruned], ["x", "n"])
    assert [row["stopped_at"] for row in rows] == ["-", "step 3: 0.25"]  # only in a round with one
    assert "no trial produced a score" in best_markdown({"best_score": None, "output_dir": "/o"}, ["x"])


async def read_artifacts(key):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async with get_client() as client:
        found = await client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    return sorted(found, key=lambda a: a.created, reverse=True)  # newest version first


def test_round_tables_and_best_markdown_are_versioned_per_search(toy, monkeypatch):
    monkeypatch.chdir(toy)
    for where in ("a", "b"):  # two runs of one search (as two nights would be)
        (toy / where).mkdir()
        code = main(["train.py", "--popsize", "3", "--round", "2", "--seed", "1", "--output-dir",
                     f"{where}/artifact-search", "plan", json.dumps({"r1c2": "crash"})])
        assert code == 0
    tables = asyncio.run(read_artifacts("autofinetune-artifact-search-round-1"))
    assert len(tables) == 2 and all(t.type == "table" for t in tables)
    rows = json.loads(tables[0].data) if isinstance(tables[0].data, str) else tables[0].data
    trials = [json.loads((toy / "b" / "artifact-search" / "round1" / f"trial-{i}.json").read_text())
              for i in range(3)]
    by_candidate = {row["candidate"]: row for row in rows}
    assert by_candidate[2]["outcome"] == "crashed" and by_candidate[2]["score"] is None
    for t in trials[:2]:
        row = by_candidate[t["candidate"]]
        assert (row["x"], row["n"], row["score"], row["parent"]) == \
            (t["params"]["x"], t["params"]["n"], t["score"], t["parent"])
    best = asyncio.run(read_artifacts("autofinetune-artifact-search-best"))
    assert len(best) == 2 and best[0].type == "markdown"
    state = json.loads((toy / "b" / "artifact-search" / "state.json").read_text())
    assert f"**Best eval score:** {state['best']['score']}" in best[0].data
    assert str(toy / "b" / "artifact-search" / "best_model") in best[0].data
