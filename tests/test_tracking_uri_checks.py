"""pipelines/teacher.py refuses a tracking URI with a password in one line that does not repeat it, and a
database store nobody answers at fails in seconds with one line (MLflow's engine would retry for minutes)."""

from __future__ import annotations

import re
import socket
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from vitpose.train.session import free_port

sys.path.insert(0, str(REPO / "pipelines"))
import teacher  # noqa: E402

SECRET = "s3cr3t-Pw-41x"


def run_teacher(monkeypatch, capsys, uri: str, *sets: str) -> tuple[int, str, str, float]:
    """(exit code, console, log file, seconds) of the teacher with ``uri`` as the tracking store."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    t0 = time.time()
    rc = teacher.main([a for s in sets for a in ("--set", s)])
    seconds = time.time() - t0
    out = capsys.readouterr()
    console = out.out + out.err
    log = Path(re.search(r"full log in (\S+)", console).group(1)).read_text()
    return rc, console, log, seconds


@pytest.mark.parametrize("uri, where", [
    (f"postgresql://mlflow:{SECRET}@127.0.0.1:{{port}}/mlflow", "PGPASSWORD"),
    (f"postgresql+psycopg://mlflow:{SECRET}@127.0.0.1:{{port}}/mlflow", "PGPASSWORD"),
    (f"mysql+pymysql://ml:{SECRET}@127.0.0.1:{{port}}/mlflow", "my.cnf"),
    (f"http://trainer:{SECRET}@127.0.0.1:{{port}}", "MLFLOW_TRACKING_PASSWORD"),
])
def test_a_password_in_the_tracking_uri_is_refused_without_repeating_it(uri, where, monkeypatch, capsys):
    rc, console, log, _ = run_teacher(monkeypatch, capsys, uri.format(port=free_port()))
    assert rc == 2
    errors = [line for line in console.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "carries a" in errors[0] and where in errors[0], console
    assert SECRET not in console and SECRET not in log


def test_a_password_given_in_the_config_is_refused_too(monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    rc = teacher.main(["--set", f"tracking.tracking_uri=postgresql://u:{SECRET}@127.0.0.1:{free_port()}/db"])
    out = capsys.readouterr()
    assert rc == 2 and "carries a password" in out.err and SECRET not in out.out + out.err


def test_an_unreachable_database_store_fails_in_seconds_with_one_line(monkeypatch, capsys):
    with socket.socket() as held:  # a port nobody listens on (bound, never listening: refused at once)
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        rc, console, _, seconds = run_teacher(monkeypatch, capsys, f"postgresql://mlflow@127.0.0.1:{port}/mlflow")
    assert rc == 2 and seconds < 30, (rc, seconds)
    errors = [line for line in console.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, console
    assert f"MLflow tracking database postgresql://mlflow@127.0.0.1:{port}/mlflow is not reachable" in errors[0]
    assert "Traceback" not in console
