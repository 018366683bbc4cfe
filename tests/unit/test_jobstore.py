"""Job ids, which need no Redis (the job store against a real redis-server:
tests/integration/test_jobstore.py)."""

from __future__ import annotations

from service.jobs.model import is_job_id, new_job_id


def test_ids_sort_by_creation_and_are_recognised():
    ids = [new_job_id() for _ in range(2000)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert all(is_job_id(i) for i in ids)
    assert ids[0].startswith("mrg_") and len(ids[0]) == 30
    assert not is_job_id("mrg_../../etc") and not is_job_id("job_" + ids[0][4:]) and not is_job_id("")
