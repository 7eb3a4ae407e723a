"""A team's tracking stack that a test starts and stops, on loopback only: PostgreSQL (the machine's server
binaries), an MLflow server on it with S3 artifacts it proxies (moto, helpers_s3) and basic auth.

The PostgreSQL server refuses to run as root, so as root it runs as the ``postgres`` user (which owns its
folder); otherwise as whoever runs the tests.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers_s3 import S3Server
from vitpose.train.session import free_port

MLFLOW = Path(sys.executable).parent / "mlflow"
# What the workers are given: the server's user, never the admin. Test values, not secrets.
USER, PASSWORD = "trainer", "tr41ner-pw-9f3c"
ADMIN, ADMIN_PASSWORD = "admin", "adm1n-pw-7d2e"


def _pg_bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))), None)
    if not found:
        raise RuntimeError(f"PostgreSQL's {name} is not installed: apt install postgresql (server binaries)")
    return found


def _as_db_owner(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@dataclass
class Postgres:
    folder: Path
    port: int

    @property
    def uri(self) -> str:
        return f"postgresql://mlflow@127.0.0.1:{self.port}/mlflow"

    def ctl(self, *args: str) -> None:
        subprocess.run(_as_db_owner([_pg_bin("pg_ctl"), "-D", str(self.folder / "data"), *args]), check=True,
                       capture_output=True, timeout=120)


@contextmanager
def postgres_server() -> Iterator[Postgres]:
    # Unix sockets live in the folder: keep its path short.
    folder = Path(tempfile.mkdtemp(prefix="vp-pg-", dir="/tmp"))
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    pg = Postgres(folder=folder, port=free_port())
    try:
        subprocess.run(_as_db_owner([_pg_bin("initdb"), "-D", str(folder / "data"), "-A", "trust", "-U", "mlflow"]),
                       check=True, capture_output=True, timeout=120)
        pg.ctl("-o", f"-p {pg.port} -k {folder} -c listen_addresses=127.0.0.1", "-l", str(folder / "log"), "-w",
               "start")
        subprocess.run(_as_db_owner([_pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(pg.port), "-U", "mlflow",
                                     "mlflow"]), check=True, capture_output=True, timeout=60)
        yield pg
    finally:
        try:
            pg.ctl("-m", "fast", "stop")
        except subprocess.CalledProcessError:
            pass  # never started
        shutil.rmtree(folder, ignore_errors=True)


@dataclass
class MlflowServer:
    """``mlflow server`` with ``--app-name basic-auth``; stop()/start() keep the port and the stores."""

    uri: str
    port: int
    cmd: list[str]
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen | None = None
    client_env: dict[str, str] = field(default_factory=dict)  # what a worker needs: URI and its user

    def start(self, timeout: float = 120) -> None:
        # Its own process group: stop() ends the server and the workers it forked.
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.time() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=5) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"mlflow server did not come up; its log:\n{self.log.read_text()[-3000:]}")
            time.sleep(1)

    def stop(self, crash: bool = False) -> None:
        """Shut the server down (SIGTERM: it finishes what it serves first), or with ``crash`` gone at once."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, 9 if crash else 15)
            self.proc.wait(timeout=60)

    def add_user(self, user: str, password: str) -> None:
        """A non-admin user that may create experiments and register models (the default permission: EDIT)."""
        from mlflow.server.auth.client import AuthServiceClient

        admin_env = {"MLFLOW_TRACKING_USERNAME": ADMIN, "MLFLOW_TRACKING_PASSWORD": ADMIN_PASSWORD}
        saved = {k: os.environ.get(k) for k in admin_env}
        os.environ.update(admin_env)
        try:
            AuthServiceClient(self.uri).create_user(user, password)
        finally:
            for k, v in saved.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


@contextmanager
def mlflow_server(pg: Postgres, s3: S3Server, bucket: str) -> Iterator[MlflowServer]:
    folder = Path(tempfile.mkdtemp(prefix="vp-mlflow-", dir="/tmp"))
    port = free_port()
    ini = folder / "basic_auth.ini"
    # EDIT for every user: workers create runs and register models; the admin password comes from the env.
    ini.write_text("[mlflow]\ndefault_permission = EDIT\n"
                   f"database_uri = sqlite:///{folder}/basic_auth.db\n"
                   f"admin_username = {ADMIN}\n"
                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    # Only the server holds the bucket's credentials: clients get artifacts through it (proxied).
    env = {**os.environ, **s3.env, "MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD,
           # CSRF key shared by the server's workers (and kept across a restart).
           "MLFLOW_FLASK_SERVER_SECRET_KEY": os.urandom(16).hex()}
    cmd = [str(MLFLOW), "server", "--app-name", "basic-auth", "--backend-store-uri", pg.uri,
           "--artifacts-destination", f"s3://{bucket}/mlartifacts", "--serve-artifacts",
           "--host", "127.0.0.1", "--port", str(port), "--workers", "2"]
    server = MlflowServer(uri=f"http://127.0.0.1:{port}", port=port, cmd=cmd, env=env, log=folder / "server.log")
    server.client_env = {"MLFLOW_TRACKING_URI": server.uri, "MLFLOW_TRACKING_USERNAME": USER,
                         "MLFLOW_TRACKING_PASSWORD": PASSWORD}
    try:
        server.start()
        server.add_user(USER, PASSWORD)
        yield server
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def plain_mlflow_server() -> Iterator[MlflowServer]:
    """``mlflow server`` on a SQLite store with artifacts it serves from a local folder, no auth: a tracking
    server to take away and bring back (``stop``/``start`` keep its port and stores)."""
    folder = Path(tempfile.mkdtemp(prefix="vp-mlflow-", dir="/tmp"))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    cmd = [str(MLFLOW), "server", "--backend-store-uri", f"sqlite:///{folder}/mlflow.db",
           "--artifacts-destination", str(folder / "artifacts"), "--serve-artifacts",
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    server = MlflowServer(uri=f"http://127.0.0.1:{port}", port=port, cmd=cmd, env=env, log=folder / "server.log")
    server.client_env = {"MLFLOW_TRACKING_URI": server.uri}
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)
