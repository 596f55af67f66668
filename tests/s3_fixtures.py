"""Fixtures for a real S3-compatible server (moto's, over HTTP) and a fresh bucket per test."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import boto3
import pytest
from botocore.config import Config
from moto.server import ThreadedMotoServer

S3_REGION = "us-east-1"


@dataclass(frozen=True)
class S3Server:
    """Where the S3 server listens, plus a raw boto3 client for arranging and inspecting test state."""

    endpoint_url: str
    region: str = S3_REGION

    def client(self) -> Any:
        config = Config(s3={"addressing_style": "path"})
        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name=self.region, config=config)

    def create_bucket(self) -> str:
        name = f"tf-test-{secrets.token_hex(6)}"
        self.client().create_bucket(Bucket=name)
        return name

    def delete_bucket(self, name: str) -> None:
        """Empty the bucket (objects and unfinished multipart uploads) and drop it."""
        client = self.client()
        for upload in client.list_multipart_uploads(Bucket=name).get("Uploads", []):
            client.abort_multipart_upload(Bucket=name, Key=upload["Key"], UploadId=upload["UploadId"])
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
            for item in page.get("Contents", []):
                client.delete_object(Bucket=name, Key=item["Key"])
        client.delete_bucket(Bucket=name)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's standalone server on a free local port; code under test reaches it only through HTTP.

    Credentials go in the environment for the whole session, as they would in a deployment: the
    stores under test find them through boto3's standard chain.
    """
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_DEFAULT_REGION", S3_REGION)
        for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            env.delenv(name, raising=False)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        try:
            yield S3Server(endpoint_url=f"http://{host}:{port}")
        finally:
            server.stop()


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> Iterator[str]:
    """A new, empty bucket of this test's own, removed afterwards."""
    name = s3_server.create_bucket()
    yield name
    s3_server.delete_bucket(name)
