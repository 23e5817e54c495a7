"""Resume by input position from the output's listing, the input check, and repeated ids found by tasks
(generation's resume by id: ``tests/test_api.py``, on the output its CLI fixture wrote)."""

import os

import numpy as np
import pyarrow as pa
import pytest

from pipelines.runtime import io
from pipelines.runtime.outputs import INDEX_NAME, CommittedParts, PartSpan, RunOutput, write_errors_part
from pipelines.runtime.repeated_ids import RepeatedIds, find_repeated_ids
from pipelines.runtime.resume import check_input_unchanged, input_versions, plan_resume, read_pending_rows
from pipelines.runtime.stats import stats_of_latents

FRAGMENTS = [io.ParquetFragment("in.parquet", group, 100 * group, 100) for group in range(3)]  # rows 0..299


def span(first: int, last: int, rows: int) -> PartSpan:
    return PartSpan(f"part-{first}-{last}", first, last, rows)


def test_listing_alone_tells_finished_skipped_and_partly_done_row_groups():
    # nothing committed: every row group is read, with no part to check
    plan = plan_resume(FRAGMENTS, [])
    assert [pending.fragment.row_group for pending in plan.pending] == [0, 1, 2] and not any(p.parts for p in plan.pending)
    # group 0 covered by two parts inside it; group 1 half done, by a part that reaches into group 2
    spans = [span(0, 49, 50), span(50, 99, 50), span(100, 149, 50), span(190, 209, 20)]
    plan = plan_resume(FRAGMENTS, spans)
    assert plan.committed_rows == 170
    assert {pending.fragment.row_group: pending.parts for pending in plan.pending} == {
        1: ("part-100-149", "part-190-209"), 2: ("part-190-209",),
    }
    # every row counted: finished without a look inside any part
    assert plan_resume(FRAGMENTS, [span(0, 299, 300)]).finished


def test_a_task_drops_exactly_the_committed_rows_of_its_row_group(tmp_path):
    source = str(tmp_path / "input.parquet")
    io.write_parquet(pa.table({"id": [f"r{index}" for index in range(300)], "prompt": ["p"] * 300}), source)
    _, fragments = io.parquet_fragments(source)
    output = RunOutput(str(tmp_path / "out"), "manifest")
    write_errors_part(pa.table({"id": ["r3", "r150"], "row": pa.array([3, 150], pa.int64()), "reason": ["x", "y"]}), output.errors_uri)
    results, errors = output.spans()
    plan = plan_resume(fragments, results + errors)
    rows = []
    for pending in plan.pending:
        batch = {key: np.array([value], dtype=object) for key, value in pending.to_item().items()}
        batch["parts"] = np.array([list(pending.parts)], dtype=object)
        rows += [row for table in read_pending_rows(batch, ["id"], rows_per_block=64) for row in table.column("row").to_pylist()]
    assert sorted(rows) == sorted(set(range(300)) - {3, 150})
    assert output.error_reasons() == {"x": 1, "y": 1} and output.counts() == (0, 2)


@pytest.mark.parametrize("storage", ["local", "s3"])
def test_the_parts_index_spares_reading_footers_and_counts_every_listed_part_once(storage, tmp_path, s3_endpoint):
    if storage == "s3":
        import boto3

        boto3.client("s3").create_bucket(Bucket="index-bucket")
    output = RunOutput(str(tmp_path / "out") if storage == "local" else "s3://index-bucket/out", "latents")
    rng = np.random.default_rng(0)
    latents = {first: rng.normal(first, 1 + first / 10, (4, 4, 2, 2)) for first in range(0, 40, 4)}

    def commit(first: int, reason: str | None = None) -> list[dict]:
        rows = pa.array(np.arange(first, first + 4), pa.int64())
        table = pa.table({"id": [f"r{row}" for row in rows.to_pylist()], "row": rows})
        errors = pa.table({"id": [f"e{first}"], "row": pa.array([1000 + first], pa.int64()), "reason": [reason]}) if reason else None
        return output.commit(table, errors, stats_of_latents(list(latents[first])))

    def assert_exact(summary, firsts: list[int]) -> None:
        values = np.moveaxis(np.concatenate([latents[first] for first in firsts]), 1, 0).reshape(4, -1)
        assert summary.stats.count.tolist() == [values.shape[1]] * 4
        np.testing.assert_allclose(summary.stats.mean, values.mean(axis=1), rtol=1e-12)
        np.testing.assert_allclose(summary.stats.std, values.std(axis=1), rtol=1e-12)

    # 1. a run whose commit tasks report their parts: the end of the run reads no footer
    committed = CommittedParts()
    for first in range(0, 32, 4):
        committed.add(commit(first, reason="bad" if first < 8 else None))
    summary = output.summarize(committed)
    assert summary.footers_read == 0 and summary.error_reasons() == {"bad": 2}
    assert_exact(summary, list(range(0, 32, 4)))
    output.save_index(summary)

    # 2. a killed run's part (in no report, in no index) is read and counted; the index covers the rest
    commit(32, reason="worse")
    summary = output.summarize()
    assert summary.footers_read == 2 and summary.error_reasons() == {"bad": 2, "worse": 1}
    assert_exact(summary, list(range(0, 36, 4)))
    output.save_index(summary)

    # 3. a rerun of the finished output reads the index only, and leaves it as it is
    summary = output.summarize()
    assert summary.footers_read == 0 and not summary.index_changed
    assert_exact(summary, list(range(0, 36, 4)))

    # 4. a part gone (a rewrite superseded it) leaves the merge; its group's other parts are read again
    gone = [uri for uri in io.list_parts(output.results_uri) if "part-000000000004-" in uri]
    io.remove_tree(gone[0])
    summary = output.summarize()
    assert 0 < summary.footers_read < 9
    assert_exact(summary, [first for first in range(0, 36, 4) if first != 4])
    output.save_index(summary)
    assert output.latent_stats().count.tolist() == summary.stats.count.tolist()

    # 5. an index that does not parse is ignored: every footer is read, the totals are the same
    io.write_bytes(io.join(output.uri, INDEX_NAME), b"not parquet")
    assert_exact(output.summarize(), [first for first in range(0, 36, 4) if first != 4])


def test_changed_moved_or_missing_input_files_are_refused_new_files_after_them_are_not(tmp_path):
    first, second = str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")
    io.write_parquet(pa.table({"prompt": ["x"] * 5}), first)
    _, fragments = io.parquet_fragments(str(tmp_path))
    recorded = input_versions(fragments)
    io.write_parquet(pa.table({"prompt": ["y"] * 3}), second)  # a new file that sorts after: fine
    _, fragments = io.parquet_fragments(str(tmp_path))
    check_input_unchanged(recorded, input_versions(fragments), fragments)

    io.write_parquet(pa.table({"prompt": ["z"] * 2}), str(tmp_path / "0-first.parquet"))  # sorts before a.parquet
    _, fragments = io.parquet_fragments(str(tmp_path))
    with pytest.raises(ValueError, match=r"a\.parquet' now starts at input row 2, not 0 .*--overwrite"):
        check_input_unchanged(recorded, input_versions(fragments), fragments)
    os.remove(tmp_path / "0-first.parquet")

    io.write_parquet(pa.table({"prompt": ["x"] * 6}), first)  # rewritten with other rows
    _, fragments = io.parquet_fragments(str(tmp_path))
    with pytest.raises(ValueError, match=r"a\.parquet' has changed since an earlier run"):
        check_input_unchanged(recorded, input_versions(fragments), fragments)


def test_repeated_ids_found_by_tasks_across_buckets_equal_a_sort_of_the_whole_column(ray_session, tmp_path, monkeypatch):
    from pipelines.runtime import repeated_ids

    generator = np.random.default_rng(5)
    ids = [None if index % 97 == 0 else f"id-{value}" for index, value in enumerate(generator.integers(0, 400, size=1000))]
    source = str(tmp_path / "ids.parquet")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": ids}), source, row_group_size=100)
    _, fragments = io.parquet_fragments(source)
    monkeypatch.setattr(repeated_ids, "ROWS_PER_TASK", 250)  # 4 reading tasks, 4 buckets
    found = find_repeated_ids(fragments, "id")
    expected = RepeatedIds.of_ids(ids)
    assert len(found) == len(expected) > 500
    assert found.positions.tolist() == expected.positions.tolist()
    assert found.first_positions.tolist() == expected.first_positions.tolist()



def test_transient_errors_have_parts_of_their_own_that_a_rerun_reopens(tmp_path):
    output = RunOutput(str(tmp_path / "out"), "manifest")
    errors = pa.table({"id": ["r1", "r2", "r5", "r9"], "row": pa.array([1, 2, 5, 9], pa.int64()), "stage": ["validate", "write", "denoiser", "write"],
                       "reason": ["prompt is null", "cannot write", "non-finite", "cannot write"],
                       "cause": ["permanent", "transient", None, "transient"]})
    written = write_errors_part(errors, output.errors_uri)
    write_errors_part(pa.table({"id": ["r7"], "row": pa.array([7], pa.int64()), "reason": ["old"]}), output.errors_uri)  # no cause: an older part

    # 1. one part per cause, told apart by name; rows without a cause are permanent
    assert [os.path.basename(uri).split("part-")[0] for uri, _ in written] == ["", "transient-"]
    summary = output.summarize()
    assert summary.error_causes() == {"permanent": 3, "transient": 2} and output.counts() == (0, 5)
    assert output.transient_error_reasons(summary) == {"cannot write": 2}
    # 2. a rerun deletes the transient parts: their rows are pending again, the others stay done
    assert output.reopen_transient_errors() == 2
    results, errors_left = output.spans()
    assert sorted(io.read_parquet_folder(output.errors_uri, ["id"]).column("id").to_pylist()) == ["r1", "r5", "r7"]
    assert not results and not any(span.transient for span in errors_left) and sum(span.rows for span in errors_left) == 3
    assert output.summarize().error_causes() == {"permanent": 3, "transient": 0}
    with pytest.raises(ValueError, match="cause: \\['flaky'\\] are not error causes"):
        write_errors_part(pa.table({"id": ["x"], "row": pa.array([0], pa.int64()), "cause": ["flaky"]}), output.errors_uri)


def test_a_read_refused_by_the_store_is_transient_an_object_not_there_is_not():
    assert io.is_transient(io.StorageError("read", "s3://b/k", "PermissionError: 403"))  # raised in a task: no cause kept
    for error, transient in ((PermissionError("Forbidden"), True), (OSError("503 SlowDown"), True), (ConnectionError("reset"), True),
                             (FileNotFoundError("s3://b/k"), False), (IsADirectoryError("k"), False), (ValueError("bad URI"), False)):
        try:
            with io.storage_errors("read", "s3://b/k"):
                raise error
        except io.StorageError as wrapped:
            assert io.is_transient(wrapped) is transient, error
