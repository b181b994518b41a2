"""A real S3 endpoint on loopback for tests: moto's server mode, one bucket, env-var wiring.

Both S3 clients clipray uses read the same standard AWS environment variables, so nothing in
the library needs a test hook:
  - pyarrow's `S3FileSystem` (clipray.manifest, via `FileSystem.from_uri`) takes the endpoint
    from `AWS_ENDPOINT_URL_S3` (the AWS C++ SDK reads it; checked with pyarrow 26), and
  - fsspec/s3fs (clipray.video for s3:// videos, clipray.pipeline for skip files) gets it
    through botocore, which reads the same variable.
The service-specific `AWS_ENDPOINT_URL_S3` is used rather than `AWS_ENDPOINT_URL` so only S3
traffic is redirected. A pickled pyarrow `S3FileSystem` does NOT carry an endpoint taken from
the environment (its `__reduce__` keeps `endpoint_override=''`), so every process that touches
S3 must see these variables: Ray worker processes inherit the environment of the process that
started Ray, which is why the test session starts this server BEFORE its local Ray
(`tests/conftest.py`: `ray_local` depends on `s3_server`).
"""

from __future__ import annotations

import os
from typing import Any

BUCKET = "clipray-test"
# Fixed fake credentials: moto accepts any; real ones must never be used by tests.
_ENV_KEYS = ("AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
             "AWS_REGION", "AWS_EC2_METADATA_DISABLED", "AWS_SESSION_TOKEN", "AWS_PROFILE")


class S3Server:
    """moto S3 on 127.0.0.1 (a free port chosen by the OS) holding one bucket.

    `start()` also points this process's environment at it (restored by `stop()`); use as a
    context manager. The bucket is created on first use (`ensure_bucket`), because moto loads
    its S3 backend on the first request (~1-2 s) and sessions that never touch S3 should not
    pay for it. `fs()` is an s3fs filesystem on it, `url(key)` an s3:// URI in the bucket.
    """

    def __init__(self, bucket: str = BUCKET):
        self.bucket = bucket
        self.endpoint = ""
        self._server: Any = None
        self._saved: dict[str, str | None] = {}
        self._bucket_made = False

    def env(self) -> dict[str, str]:
        """The variables both pyarrow and s3fs/botocore read to reach this server."""
        return {
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1",
            # no instance-metadata probes (each one is a timeout on a machine off EC2)
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def start(self) -> "S3Server":
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request

        # port 0: the OS picks a free port, so parallel test sessions never collide
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        for k in _ENV_KEYS:
            self._saved[k] = os.environ.get(k)
        # a developer's session token or profile would otherwise mix with the fake keys
        os.environ.pop("AWS_SESSION_TOKEN", None)
        os.environ.pop("AWS_PROFILE", None)
        os.environ.update(self.env())
        return self

    def ensure_bucket(self) -> "S3Server":
        if not self._bucket_made:
            self.fs().mkdir(self.bucket)  # s3fs mkdir at the top level creates a bucket
            self._bucket_made = True
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None
        for k, v in self._saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        self._saved = {}

    def __enter__(self) -> "S3Server":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def fs(self) -> Any:
        """A fresh (uncached) s3fs filesystem on this endpoint."""
        import s3fs

        return s3fs.S3FileSystem(key="testing", secret="testing", skip_instance_cache=True,
                                 endpoint_url=self.endpoint)

    def url(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{key.lstrip('/')}"
