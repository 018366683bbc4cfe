"""The webhook due queue: job ids whose webhook delivery is due, by due time.

The job store's transition script puts a job id here in the same atomic step that makes
the job terminal (so no terminal job is ever missed); the delivery loop
(service/webhooks.py) in every API process and worker claims due ids with a lease (a
crashed deliverer's claim expires and someone else retries) and schedules the next
attempt or drops the id when it is done.
"""

from __future__ import annotations

import json
import time

from .keys import Keys
from .scripts import Script


class WebhookQueue:
    def __init__(self, client, keys: Keys):
        self.r, self.keys = client, keys
        self._claim = Script(client, "claim_webhook")

    def claim_due(self, lease_s: float) -> str | None:
        """The id of the earliest due delivery, leased for ``lease_s``; None if none is due."""
        return self._claim(keys={"webhooks_due": self.keys.webhooks_due},
                           args={"now": repr(time.time()), "lease_s": repr(lease_s)})

    def schedule(self, job_id: str, state: dict, due: float | None) -> None:
        """Record a delivery attempt's outcome and when to try again (None: done)."""
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(self.keys.job(job_id), "webhook_state", json.dumps(state))
        if due is None:
            pipe.zrem(self.keys.webhooks_due, job_id)
        else:
            pipe.zadd(self.keys.webhooks_due, {job_id: due})
        pipe.execute()
