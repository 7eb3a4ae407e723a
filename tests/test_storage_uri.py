"""vitpose.run.storage: run storage by URI (local path, s3:// on a local moto server), the probe that stops a run
on unreachable storage, and the checkpoint checks and run-folder side files on object storage."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from tests.helpers_s3 import s3_server
from vitpose.config import REPO_ROOT, ConfigError
from vitpose.run.lifecycle import read_run_id, write_run_id
from vitpose.run.storage import Storage, StorageError, check_storage, credentials_env, open_storage
from vitpose.train.run_folder import (
    IncompleteCheckpointError,
    newest_complete_checkpoint,
    verify_checkpoint,
    write_rank_marker,
)
from vitpose.train.worker import clear_fatal, read_fatal

BUCKET = "vitpose-test"

sys.path.insert(0, str(REPO_ROOT / "pipelines"))
import teacher  # noqa: E402


@pytest.fixture(scope="module")
def s3():
    with s3_server() as server:
        server.create_bucket(BUCKET)
        yield server


@pytest.fixture
def s3_env(s3, monkeypatch):
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    return s3


def fake_checkpoint(folder: Path, epoch: int, world: int = 2) -> Path:
    """A checkpoint folder in the run-folder format (see vitpose.train.run_folder), tiny."""
    (folder / "ds").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"w" * 100)
    (folder / "meta.json").write_text(json.dumps({"epoch": epoch, "world_size": world}))
    for r in range(world):
        (folder / "ds" / f"shard{r}.pt").write_bytes(b"s" * (10 + r))
        write_rank_marker(folder, r)
    return folder


def test_plain_paths_are_local_and_relative_ones_start_at_the_repo(tmp_path):
    rel = Storage.parse("runs/ray")
    assert rel.is_local and rel.local_path == REPO_ROOT / "runs" / "ray" and str(rel) == str(REPO_ROOT / "runs/ray")
    absolute = Storage.parse(str(tmp_path))
    assert absolute.is_local and str(absolute / "x") == str(tmp_path / "x")
    assert Storage.parse(f"file://{tmp_path}").local_path == tmp_path


def test_s3_uri_is_a_bucket_path_never_a_folder_under_the_repo(s3_env):
    s = Storage.parse(f"s3://{BUCKET}/runs")
    assert not s.is_local and s.path == f"{BUCKET}/runs" and s.uri == f"s3://{BUCKET}/runs"
    assert str(s / "a" / "b") == f"s3://{BUCKET}/runs/a/b"
    with pytest.raises(ValueError, match="not on this machine"):
        _ = s.local_path


@pytest.mark.parametrize("where", ["local", "s3"])
def test_read_write_list_delete_and_folders_in_and_out(where, s3_env, tmp_path):
    root = Storage.local(tmp_path / "store") if where == "local" else Storage.parse(f"s3://{BUCKET}/ops-{time.time_ns()}")
    f = root / "run-1" / "note.txt"
    assert not f.exists() and not f.is_file()
    with pytest.raises(FileNotFoundError):
        f.read_text()
    f.write_text("one\n")
    f.write_text("two\n")  # replaced whole
    assert f.read_text() == "two\n" and f.is_file() and (root / "run-1").is_dir()
    assert [c.name for c in root.iterdir()] == ["run-1"]
    assert root.file_sizes() == {"run-1/note.txt": 4}
    f.unlink()
    f.unlink()  # missing_ok
    assert not f.exists()

    src = fake_checkpoint(tmp_path / "src" / "checkpoint_000000", epoch=0)
    (root / "ck").upload(src)
    assert (root / "ck").file_sizes() == {str(p.relative_to(src)): p.stat().st_size for p in src.rglob("*")
                                          if p.is_file()}
    with (root / "ck").as_local_dir() as local:
        assert (local / "ds" / "shard1.pt").read_bytes() == b"s" * 11
        if where == "s3":
            kept = local
    if where == "s3":
        assert not kept.exists(), "the temporary copy of an object-store folder is deleted afterwards"
    (root / "ck").rmtree()
    assert not (root / "ck").exists()


def test_checkpoint_checks_read_object_storage_in_place(s3_env, tmp_path):
    run = Storage.parse(f"s3://{BUCKET}/ckpt-{time.time_ns()}/run")
    for epoch in (0, 1):
        (run / f"checkpoint_00000{epoch}").upload(fake_checkpoint(tmp_path / f"c{epoch}", epoch))
    assert f"{run.path.split('/', 1)[1]}/checkpoint_000001/rank1.complete" in s3_env.keys(BUCKET)  # in the bucket
    assert verify_checkpoint(run / "checkpoint_000001")["epoch"] == 1
    assert newest_complete_checkpoint(run) == run / "checkpoint_000001"
    # A save cut off on the store: a shard that never arrived. The previous complete checkpoint is chosen.
    (run / "checkpoint_000001" / "ds" / "shard1.pt").unlink()
    with pytest.raises(IncompleteCheckpointError, match="shard1.pt of rank 1 is missing"):
        verify_checkpoint(run / "checkpoint_000001")
    assert newest_complete_checkpoint(run) == run / "checkpoint_000000"


def test_local_checkpoint_checks_answer_as_before(tmp_path):
    for epoch in (0, 1):
        fake_checkpoint(tmp_path / f"checkpoint_00000{epoch}", epoch)
    assert newest_complete_checkpoint(tmp_path) == tmp_path / "checkpoint_000001"  # a Path in, a Path out
    (tmp_path / "checkpoint_000001" / "model.safetensors").write_bytes(b"short")
    with pytest.raises(IncompleteCheckpointError, match=r"model.safetensors of rank \d has 5 bytes, 100 were"):
        verify_checkpoint(tmp_path / "checkpoint_000001")
    assert newest_complete_checkpoint(tmp_path) == tmp_path / "checkpoint_000000"


@pytest.mark.parametrize("where", ["local", "s3"])
def test_run_id_and_fatal_error_files(where, s3_env, tmp_path):
    run = Storage.local(tmp_path / "run") if where == "local" else Storage.parse(f"s3://{BUCKET}/side-{time.time_ns()}")
    assert read_run_id(run) is None and read_fatal(run) is None
    write_run_id(run, "abc123")
    assert read_run_id(run) == "abc123" and (run / "mlflow_run_id.txt").read_text() == "abc123\n"
    (run / "fatal_error.json").write_text(json.dumps({"message": "bad data"}))
    assert read_fatal(run) == "bad data"
    clear_fatal(run)
    assert read_fatal(run) is None
    if where == "local":  # the same files as before, given as Paths
        assert read_run_id(tmp_path / "run") == "abc123"
    else:
        assert f"{run.path.split('/', 1)[1]}/mlflow_run_id.txt" in s3_env.keys(BUCKET)


def test_probe_passes_on_a_reachable_bucket_and_leaves_nothing(s3_env):
    store = Storage.parse(f"s3://{BUCKET}/probe-{time.time_ns()}")
    check_storage(store)
    prefix = store.path.split("/", 1)[1]
    # pyarrow keeps the emptied folder as a zero-byte "folder/" marker; the probe object itself is gone
    assert s3_env.keys(BUCKET, prefix) in ([], [f"{prefix}/"])


def test_missing_bucket_and_unreachable_endpoint_fail_in_seconds_with_one_line(s3_env, monkeypatch):
    t0 = time.time()
    with pytest.raises(StorageError) as missing:
        check_storage(Storage.parse("s3://no-such-bucket/runs"))
    line = str(missing.value)
    assert line.startswith("ray.storage_path=s3://no-such-bucket/runs: ") and "\n" not in line
    assert "bucket does not exist" in line and line.endswith("(check AWS_ENDPOINT_URL / credentials)")
    assert isinstance(missing.value, ConfigError)  # the pipelines' one-line exit 2

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    with pytest.raises(StorageError, match=r"^ray.storage_path=s3://vitpose-test/runs: .*connect"):
        check_storage(Storage.parse(f"s3://{BUCKET}/runs"))
    assert time.time() - t0 < 30


def test_workers_get_where_the_storage_is_never_who_we_are(monkeypatch):
    """What the driver hands Ray's workers (Ray shows it in its job metadata): endpoints and region only; keys,
    secrets, tokens, users, passwords, profiles and credential files stay with each node."""
    where = {"AWS_ENDPOINT_URL": "http://minio:9000", "AWS_DEFAULT_REGION": "eu-west-1", "AWS_REGION": "eu-west-1",
             "AWS_EC2_METADATA_DISABLED": "true", "MLFLOW_TRACKING_URI": "http://mlflow:5000",
             "MLFLOW_TRACKING_INSECURE_TLS": "false"}
    who = {"AWS_ACCESS_KEY_ID": "AKIA1", "AWS_SECRET_ACCESS_KEY": "s3cret", "AWS_SESSION_TOKEN": "tok",
           "AWS_PROFILE": "team", "AWS_SHARED_CREDENTIALS_FILE": "/root/.aws/credentials",
           "AWS_ROLE_ARN": "arn:aws:iam::1:role/x", "AWS_WEB_IDENTITY_TOKEN_FILE": "/var/run/token",
           "GOOGLE_APPLICATION_CREDENTIALS": "/secrets/sa.json", "MLFLOW_TRACKING_USERNAME": "ann",
           "MLFLOW_TRACKING_PASSWORD": "pw", "MLFLOW_TRACKING_TOKEN": "t"}
    env = credentials_env({**where, **who, "PATH": "/usr/bin", "HOME": "/root"})
    assert env == where
    assert credentials_env({"HOME": "/root"}) == {}


def test_uri_options_reach_every_folder_and_file_below_it(s3_env, monkeypatch):
    """The endpoint given in the URI, not the environment's (which points nowhere here), is the one the probe,
    the children and a URI read back from a child's name (as Ray and the workers read it) all talk to."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    root = Storage.parse(f"s3://{BUCKET}/opts-{time.time_ns()}?endpoint_override={s3_env.endpoint}")
    check_storage(root)
    child = root / "run-1" / "note.txt"
    assert child.uri == f"s3://{root.path}/run-1/note.txt?endpoint_override={s3_env.endpoint}"
    child.write_text("via the URI's endpoint\n")
    again = Storage.parse(child.uri)  # a new filesystem from the name alone
    assert again.read_text() == "via the URI's endpoint\n" and again == child
    assert [c.uri for c in root.iterdir()] == [(root / "run-1").uri] and child.parent.parent == root
    assert f"{root.path.split('/', 1)[1]}/run-1/note.txt" in s3_env.keys(BUCKET)
    with pytest.raises(OSError, match="127.0.0.1:9|connect"):  # the same path without the options: elsewhere
        Storage.parse(f"s3://{root.path}/run-1/note.txt").read_text()


SECRET = "Zq7-not-for-logs"


@pytest.mark.parametrize("uri", [
    f"s3://AKIAEXAMPLE:{SECRET}@{BUCKET}/runs",
    f"s3://{SECRET}@{BUCKET}/runs",
    f"s3://{BUCKET}/runs?access_key=AKIAEXAMPLE&secret_key={SECRET}",
    f"s3://{BUCKET}/runs?endpoint_override=http://127.0.0.1:9&session_token={SECRET}",
    f"gs://{BUCKET}/runs?access_token={SECRET}",
])
def test_a_uri_with_credentials_is_refused_without_repeating_them(uri, synthetic_root, tmp_path, monkeypatch, capsys):
    with pytest.raises(StorageError) as refused:
        open_storage(uri)
    line = str(refused.value)
    assert line.startswith("ray.storage_path=") and "carries credentials" in line and "\n" not in line
    assert SECRET not in line and "AKIAEXAMPLE" not in line
    # The real pipeline: one error line, exit 2, before anything starts; the secret nowhere in its output.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert teacher.main(["--set", f"data.root={synthetic_root}", "--set", f"ray.storage_path={uri}"]) == 2
    out = capsys.readouterr()
    errors = [line for line in (out.out + out.err).splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "carries credentials" in errors[0], out
    assert SECRET not in out.out + out.err
    log = next(line.split("full log in ", 1)[1] for line in (out.out + out.err).splitlines() if "full log in " in line)
    assert SECRET not in Path(log).read_text()
