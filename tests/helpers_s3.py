"""An S3-compatible server a test starts and stops (moto in server mode, own port, loopback only), and the
environment that points pyarrow, boto3 and our workers at it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from vitpose.train.session import free_port


@dataclass
class S3Server:
    endpoint: str  # http://127.0.0.1:<port>
    port: int
    server: object  # moto.server.ThreadedMotoServer

    @property
    def env(self) -> dict[str, str]:
        """What a client needs: the standard AWS variables (pyarrow and boto3 read them)."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}

    def client(self):  # noqa: ANN201 (boto3 client)
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="testing",
                            aws_secret_access_key="testing", region_name="us-east-1")

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def stop(self) -> None:
        self.server.stop()

    def start(self) -> None:
        """Start (again, on the same port: the buckets live in this process's memory and survive a restart)."""
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()


@contextmanager
def s3_server() -> Iterator[S3Server]:
    port = free_port()
    server = S3Server(endpoint=f"http://127.0.0.1:{port}", port=port, server=None)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class SignedS3Server:
    """moto in its own process with request signatures checked: only the one user made here gets in, so a client
    reaching the bucket proves it holds that user's secret."""

    endpoint: str
    access_key: str
    secret_key: str

    @property
    def identity_env(self) -> dict[str, str]:
        """Who we are, the standard AWS way (what a node's environment or ~/.aws/credentials would hold)."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}

    def client(self):  # noqa: ANN201 (boto3 client)
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name="us-east-1")

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


@contextmanager
def signed_s3_server(bucket: str) -> Iterator[SignedS3Server]:
    """A moto server (loopback, own port) that checks signatures after the first three requests, which make
    the user, its S3 policy and its access key; ``bucket`` is created as that user."""
    import json
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    import boto3

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="setup",
                           aws_secret_access_key="setup")
        deadline = time.time() + 30
        while True:
            try:
                iam.create_user(UserName="trainer")
                break
            except Exception:  # noqa: BLE001 (not up yet: connection refused)
                assert proc.poll() is None and time.time() < deadline, "moto_server did not start"
                time.sleep(0.3)
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
        iam.put_user_policy(UserName="trainer", PolicyName="s3", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="trainer")["AccessKey"]
        server = SignedS3Server(endpoint, key["AccessKeyId"], key["SecretAccessKey"])
        server.client().create_bucket(Bucket=bucket)
        yield server
    finally:
        proc.terminate()
        proc.wait(timeout=30)
