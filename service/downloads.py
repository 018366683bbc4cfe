"""Presigned download URLs of a succeeded job's files (``GET /v1/merges/{id}/files``).

A presigned URL is signed here, with the API's own S3 credentials (boto3's usual chain:
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, a profile, an instance role), and needs
no request to S3: whoever holds it may GET that one object until it expires
(``DRMERGE_DOWNLOAD_URL_TTL_S``, 15 minutes by default), so the API answers with
``Cache-Control: no-store``. ``DRMERGE_DOWNLOAD_ENDPOINT_URL`` names the S3 endpoint as
the callers reach it, when the API reaches S3 by another address (a cluster-internal
name). boto3 only: the API never needs torch.
"""

from __future__ import annotations

import threading
import time

from drmerge import locations

_lock = threading.Lock()


class SigningUnavailable(RuntimeError):
    """The API has no S3 credentials to sign with."""


class Presigner:
    def __init__(self, settings):
        import boto3
        from botocore.config import Config

        endpoint = settings.download_endpoint_url or settings.s3_endpoint_url
        s3 = {"addressing_style": "path"} if endpoint else {}
        with _lock:  # boto3's default session is not thread-safe to create clients from
            session = boto3.session.Session(region_name=settings.s3_region)
            self.client = session.client("s3", endpoint_url=endpoint,
                                         config=Config(signature_version="s3v4", s3=s3))
        self.ttl_s = int(settings.download_url_ttl_s)

    def links(self, output: str, files: list[dict], now: float | None = None) -> list[dict]:
        """One presigned GET per file of ``output`` (an ``s3://`` prefix)."""
        from botocore.exceptions import BotoCoreError, NoCredentialsError

        bucket, prefix = locations.split_s3(output)
        now = time.time() if now is None else now
        out = []
        for f in files:
            key = prefix + f["name"]  # split_s3's prefix is "" or ends in "/"
            try:
                url = self.client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key},
                                                         ExpiresIn=self.ttl_s)
            except NoCredentialsError:
                raise SigningUnavailable("the API has no S3 credentials to sign download URLs with (AWS_* "
                                         "variables, a profile or a role)") from None
            except BotoCoreError as e:
                raise SigningUnavailable(f"cannot sign a download URL: {e}") from None
            out.append({"name": f["name"], "size": f["size"], "sha256": f["sha256"], "url": url,
                        "expires_at": now + self.ttl_s})
        return out
