"""The API process must not import torch: it validates specs with the torch-free
drmerge.spec and enqueues merges by task name."""

from __future__ import annotations

import json
import os
import subprocess
import sys

SCRIPT = r"""
import json, sys
from fastapi.testclient import TestClient
from service.app import create_app
from service.keys import KeyStore
from service.settings import get_settings

key, _ = KeyStore.from_settings(get_settings()).create("torchfree", allow=["*"])
app = create_app()
with TestClient(app, headers={"authorization": "Bearer " + key}) as client:
    spec = {"base_model": "s3://bkt-x/base/", "models": ["s3://bkt-x/a/", "s3://bkt-x/b/"], "output": "s3://bkt-x/o/"}
    created = client.post("/v1/merges", json={"spec": spec})
    bad = client.post("/v1/merges", json={"spec": dict(spec, parameters={"drop_rate": 3})})
    got = client.get("/v1/merges/" + created.json()["id"])
    listed = client.get("/v1/merges")
    cancel = client.post("/v1/merges/" + created.json()["id"] + "/cancel")
    metrics = client.get("/metrics")
    ready = client.get("/readyz")
print(json.dumps({"codes": [created.status_code, bad.status_code, got.status_code, listed.status_code,
                            cancel.status_code, metrics.status_code, ready.status_code],
                  "torch": "torch" in sys.modules,
                  "heavy": sorted(m for m in ("torch", "safetensors", "numpy", "transformers") if m in sys.modules)}))
"""


def test_api_process_never_imports_torch(redis_server, s3_server):
    env = dict(os.environ, DRMERGE_REDIS_URL=redis_server.url, DRMERGE_KEY_PREFIX="torchfree",
               DRMERGE_QUEUE="torchfree-idle", DRMERGE_API_KEY_PEPPER="torchfree-pepper-0123456789",
               **s3_server.env())
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=root, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["codes"] == [202, 422, 200, 200, 200, 200, 200]
    assert result["torch"] is False, result["heavy"]
    assert "safetensors" not in result["heavy"]
