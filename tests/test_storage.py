"""tune/storage.py: a search's storage as a local path or an object-store URI (an S3 server on
loopback), files published whole, credentials kept out of URIs and pickles."""

import io
import pickle

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from s3_server import start_s3

from tune.errors import ConfigError
from tune.storage import Location, StorageError
from tune.trial.table import TrialRow, read_rows, write_table


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = start_s3(tmp_path_factory.mktemp("s3"))
    server.make_bucket("lpt-unit")  # moto keeps one store per process: a bucket of its own
    with pytest.MonkeyPatch.context() as mp:
        for k, v in server.env().items():
            mp.setenv(k, v)
        mp.delenv("AWS_ACCESS_KEY_ID", raising=False)
        mp.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
        yield server
    server.stop()


def test_names_of_local_and_object_locations(tmp_path):
    local = Location(str(tmp_path / "runs"))
    assert local.is_local and str(local / "a" / "b.json") == str(tmp_path / "runs" / "a" / "b.json")
    remote = Location("s3://bucket/runs/?endpoint_override=127.0.0.1:9000&scheme=http")
    child = remote / "search-1" / "search.json"
    assert str(child) == "s3://bucket/runs/search-1/search.json?endpoint_override=127.0.0.1:9000&scheme=http"
    assert (
        child.name == "search.json"
        and child.parent.name == "search-1"
        and child.path == "bucket/runs/search-1/search.json"
    )
    assert not remote.is_local and Location(str(remote)) == remote
    assert Location("file://" + str(tmp_path)) == Location(tmp_path)


def test_a_uri_with_credentials_or_no_bucket_is_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"^--storage: the URI holds secret_key; it is recorded in MLflow") as exc:
        Location("s3://b/p?endpoint_override=h:1&secret_key=abc&scheme=http")
    assert "abc" not in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(StorageError, match=r"^--storage s3:///p: no bucket"):
        Location("s3:///p")


def test_files_are_published_read_and_listed_through_the_store(s3):
    root = Location(s3.uri("lpt-unit", "runs"))
    root.check_reachable()
    (root / "s1" / "search.json").write_text('{"a": 1}')
    (root / "s1" / "prompts" / "t1.safetensors").write_bytes(b"\0" * 10)
    (root / "s2" / "search.json").write_text("{}")
    assert [c.name for c in root.children()] == ["s1", "s2"]
    assert sorted(f.path for f in (root / "s1").files()) == [
        "lpt-unit/runs/s1/prompts/t1.safetensors",
        "lpt-unit/runs/s1/search.json",
    ]
    assert (root / "s1" / "search.json").read_text() == '{"a": 1}' and (root / "s1" / "search.json").is_file()
    assert not (root / "s3" / "search.json").exists() and (root / "nothing").children() == []
    with (root / "s1" / "prompts" / "t1.safetensors").local_copy() as path:
        assert path.read_bytes() == b"\0" * 10
    (root / "s1" / "search.json").delete()
    assert not (root / "s1" / "search.json").exists()
    with pytest.raises(FileNotFoundError, match=r"s3://lpt-unit/runs/s1/search.json\?.*: no such file"):
        (root / "s1" / "search.json").read_bytes()


def test_the_trial_table_round_trips_with_its_metadata_on_the_store(s3):
    path = Location(s3.uri("lpt-unit", "tables")) / "trials.parquet"
    assert read_rows(path) == {}
    rows = [TrialRow(trial_id="b", status="completed", val_acc=1.0), TrialRow(trial_id="a", status="failed")]
    write_table(rows, path, metadata={"lpt.budget": "{}"})
    assert list(read_rows(path)) == ["a", "b"]
    table = pq.read_table(io.BytesIO(path.read_bytes()))
    assert table.schema.metadata[b"lpt.budget"] == b"{}" and isinstance(table, pa.Table)


def test_a_missing_bucket_and_an_unreachable_store_are_one_line(s3):
    with pytest.raises(
        StorageError, match=r"^--storage s3://nobucket/x\?.*: bucket 'nobucket' does not exist; create it first$"
    ):
        Location(s3.uri("nobucket", "x")).check_reachable()
    with pytest.raises(
        StorageError, match=r"^--storage s3://lpt-unit/x\?endpoint_override=127.0.0.1:1&scheme=http: cannot reach"
    ):
        Location("s3://lpt-unit/x?endpoint_override=127.0.0.1:1&scheme=http").check_reachable()


def test_a_pickled_location_carries_no_credentials(s3):
    loc = Location(s3.uri("lpt-unit", "runs"))
    loc.exists()  # resolves (and caches) its filesystem, with the credentials from the file
    blob = pickle.dumps(loc) + pickle.dumps(loc.fs)
    assert s3.secret.encode() not in blob and b"lpt-test-key" not in blob
    assert pickle.loads(pickle.dumps(loc)) == loc
