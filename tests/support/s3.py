"""A local S3-compatible server for tests: moto's server on 127.0.0.1, in a thread of the pytest process.

    with LocalS3() as s3:
        uri = s3.uri("shards")      # s3://BUCKET/shards?endpoint_override=127.0.0.1:PORT&scheme=http&region=...
        s3.keys("shards/")          # what the bucket really holds, listed through boto3

The endpoint travels in the URI (pyarrow reads `endpoint_override`, `scheme` and `region` from its query), so
Ray workers that were running before the server started reach it too. Credentials do not: pyarrow takes them
from the environment, so the driver gets `S3_TEST_ENV` here and the session's Ray workers get it from
tests/conftest.py. The server checks no signatures, but refuses unsigned requests to objects it holds.
"""

from __future__ import annotations

import logging
import os

# placeholder credentials, in the driver and every Ray worker of the test session; no metadata-service lookups
S3_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}

REGION = S3_TEST_ENV["AWS_DEFAULT_REGION"]


class LocalS3:
    """moto's ThreadedMotoServer bound to 127.0.0.1 on a free port, with one bucket; sets `S3_TEST_ENV` in
    this process while it runs (restored on stop)."""

    def __init__(self, bucket: str = "mrcnn-test"):
        self.bucket = bucket
        self._server = None
        self._saved_env: dict[str, str | None] = {}
        self.host, self.port = "127.0.0.1", 0

    def start(self) -> LocalS3:
        import boto3
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not one log line per request
        for key, value in S3_TEST_ENV.items():
            self._saved_env[key] = os.environ.get(key)
            os.environ[key] = value
        # ignored by pyarrow (the URIs carry the endpoint); keeps a real endpoint from being used by boto3
        self._saved_env["AWS_ENDPOINT_URL"] = os.environ.pop("AWS_ENDPOINT_URL", None)
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        self.host, self.port = self._server.get_host_and_port()
        self.client = boto3.client("s3", endpoint_url=self.endpoint_url, region_name=REGION)
        self.client.create_bucket(Bucket=self.bucket)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    def __enter__(self) -> LocalS3:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def uri(self, key: str) -> str:
        """`s3://bucket/key` with the server's endpoint in the query, as every stage takes it."""
        return f"s3://{self.bucket}/{key.strip('/')}?endpoint_override={self.host}:{self.port}&scheme=http&region={REGION}"

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key under `prefix`, as the server lists them (boto3, not pyarrow)."""
        keys = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            keys.extend(obj["Key"] for obj in page.get("Contents", []))
        return sorted(keys)
