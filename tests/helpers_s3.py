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
