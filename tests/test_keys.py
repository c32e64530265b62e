"""The storage layout's parsers read back exactly what its builders write (amodal.keys)."""
from __future__ import annotations

from amodal import keys


def test_state_keys_give_back_their_version_and_sort_in_version_order():
    written = [keys.state_key("abc", v) for v in (0, 7, 12, 100)]
    assert [keys.state_version(k) for k in written] == [0, 7, 12, 100]
    assert sorted(written) == written and all(k.startswith(keys.states_prefix("abc")) for k in written)


def test_outcome_keys_give_back_their_status_and_job():
    assert keys.parse_outcome_key(keys.outcome_key("ds", "done", "j1")) == ("done", "j1")


def test_only_submission_keys_name_a_dataset():
    assert keys.dataset_of_submission(keys.submission_key("cats")) == "cats"
    assert keys.dataset_of_submission(keys.counts_key("cats")) is None
    assert keys.dataset_of_submission(keys.rows_chunk_key("cats", 0, 0)) is None
    assert keys.dataset_of_submission("datasets/submission.json") is None
