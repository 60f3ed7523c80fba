"""Experiment trackers: a run's records reach W&B (offline) and MLflow (file store, SQLite) as metrics.jsonl has them.

Each tracker's records are read back through its own library: W&B's reader of
its offline run files (`wandb leet inspect --json`) and MLflow's client. Nothing
touches the network.
"""

import json
import logging
import pathlib
import subprocess
import sys
import time

import pytest

from jaxgen.errors import ConfigError
from jaxgen.metrics import MetricsWriter, read_metrics
from jaxgen.trackers import Trackers, flatten

from conftest import TINY_CONFIG, tiny_config
from helpers import run_jaxgen

OFFLINE = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
TINY = ("train.steps=6", "checkpoint.every=2", "logging.every=1", "train.eval_every=3", "train.sample_tokens=0")


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """No network, and nothing written outside the test's folders."""
    home = tmp_path_factory.mktemp("tracker-home")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in OFFLINE.items():
            mp.setenv(key, value)
        for key in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
            mp.setenv(key, str(home / key.lower()))
        # wandb keeps media and artifact staging in temporary directories that a killed run never removes.
        (home / "tmp").mkdir()
        mp.setenv("TMPDIR", str(home / "tmp"))
        mp.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)  # jaxgen opts in for a configured file: URI
        yield


def train(run_dir: pathlib.Path, *overrides: str, crash: tuple[str, int] | None = None) -> None:
    result = run_jaxgen("train", "--config", str(TINY_CONFIG), "--run-dir", str(run_dir), *TINY, *overrides,
                        crash=crash)
    assert result.returncode == (137 if crash else 0), result.stderr[-3000:]


@pytest.fixture(scope="module")
def file_store_run(offline, tmp_path_factory):
    """W&B offline and MLflow's file store, in one uninterrupted run."""
    run_dir = tmp_path_factory.mktemp("trackers") / "run"
    train(run_dir, "logging.wandb.mode=offline", f"logging.mlflow.tracking_uri=file:{run_dir.parent / 'mlruns'}",
          "logging.mlflow.experiment=tiny")
    return run_dir


@pytest.fixture(scope="module")
def resumed_run(offline, tmp_path_factory):
    """W&B offline and MLflow's default SQLite store; killed while saving step 4, then resumed from step 2."""
    run_dir = tmp_path_factory.mktemp("trackers") / "run"
    overrides = ("logging.wandb.mode=offline", "logging.wandb.name=resumed", "logging.mlflow={}")
    train(run_dir, *overrides, crash=("during-save", 4))
    first = json.loads((run_dir / "trackers.json").read_text())
    sent_before_kill = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    train(run_dir, *overrides)
    return run_dir, first, sent_before_kill


def jsonl(run_dir: pathlib.Path, key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in read_metrics(run_dir / "metrics.jsonl") if r.get(key) is not None]


def wandb_records(run_dir: pathlib.Path) -> list[list[dict]]:
    """Each offline W&B session's records, oldest first, through W&B's own reader of its run files."""
    sessions = []
    for run_file in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_file)],
                             capture_output=True, text=True, check=True, timeout=120).stdout
        sessions.append([json.loads(line) for line in out.splitlines() if line.startswith("{")])
    return sessions


def wandb_history(records: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["history"]["step"].get("num", 0), r["history"]["item"][key])
            for r in records if r["type"] == "history" and key in r["history"]["item"]]


def mlflow_client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri)


def mlflow_history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


# ----------------------------------------------------------------------------- W&B offline



def assert_same_series(got: list, expected: list, what: str) -> None:
    """(step, value) pairs: the same steps, values equal up to float rounding (pytest.approx takes no pairs)."""
    assert [step for step, _ in got] == [step for step, _ in expected], what
    assert [value for _, value in got] == pytest.approx([value for _, value in expected]), what

def test_wandb_offline_run_records_what_metrics_jsonl_records(file_store_run):
    [records] = wandb_records(file_store_run)
    for key in ("loss", "eval_loss", "grad_norm", "lr"):
        assert_same_series(wandb_history(records, key), jsonl(file_store_run, key), key)
    [run] = [r["run"] for r in records if r["type"] == "run"]
    assert run["project"] == "jaxgen" and run["display_name"] == "run"
    assert run["config"]["update"]["optimizer.lr"] == tiny_config().optimizer.lr  # the config, flattened
    assert run["run_id"] == json.loads((file_store_run / "trackers.json").read_text())["wandb"]["id"]
    [exit_record] = [r["exit"] for r in records if r["type"] == "exit"]
    assert exit_record.get("exit_code", 0) == 0


def test_wandb_gets_the_loss_curve_as_an_image(file_store_run):
    [records] = wandb_records(file_store_run)
    [(step, kind)] = wandb_history(records, "loss_curve._type")  # the reader shows nested keys dotted
    [(_, path)] = wandb_history(records, "loss_curve.path")
    assert step == 6 and kind == "image-file"
    [run_files] = (file_store_run / "wandb").glob("offline-run-*/files")
    assert (run_files / path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- MLflow file store


def test_mlflow_file_store_records_what_metrics_jsonl_records(file_store_run, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps its file store behind this opt-in
    stored = json.loads((file_store_run / "trackers.json").read_text())["mlflow"]
    client = mlflow_client(stored["tracking_uri"])
    run = client.get_run(stored["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert client.get_experiment(run.info.experiment_id).name == "tiny"
    for key in ("loss", "eval_loss", "grad_norm", "lr"):
        assert_same_series(mlflow_history(client, run.info.run_id, key), jsonl(file_store_run, key), key)
    assert run.data.params["optimizer.lr"] == str(tiny_config().optimizer.lr)
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    assert any(path.startswith("images/loss_curve+step+6+") and path.endswith(".png") for path in images), images


# ----------------------------------------------------------------------------- resumed: SQLite and W&B


def test_resumed_run_continues_the_same_mlflow_run_with_each_step_once(resumed_run):
    run_dir, first, sent_before_kill = resumed_run
    assert sent_before_kill == [1, 2, 3, 4]  # steps 3 and 4 were sent, then lost with the unfinished checkpoint
    stored = json.loads((run_dir / "trackers.json").read_text())
    assert stored["mlflow"] == first["mlflow"] and stored["wandb"]["id"] == first["wandb"]["id"]
    assert stored["mlflow"]["tracking_uri"] == f"sqlite:///{run_dir / 'mlflow.db'}"
    client = mlflow_client(stored["mlflow"]["tracking_uri"])
    run = client.get_run(stored["mlflow"]["run_id"])
    assert run.info.status == "FINISHED"
    assert [run.info.run_id] == [r.info.run_id for r in client.search_runs([run.info.experiment_id])]
    for key in ("loss", "eval_loss"):
        assert_same_series(mlflow_history(client, run.info.run_id, key), jsonl(run_dir, key), key)
    assert [step for step, _ in mlflow_history(client, run.info.run_id, "loss")] == [1, 2, 3, 4, 5, 6]  # once each
    assert run.info.artifact_uri.startswith((run_dir / "mlartifacts").as_uri())


def test_resumed_run_continues_the_same_wandb_run_with_each_step_once(resumed_run):
    run_dir, first, _ = resumed_run
    sessions = wandb_records(run_dir)
    assert len(sessions) == 2  # `wandb sync` uploads both, in order, into one run
    runs = [r["run"] for records in sessions for r in records if r["type"] == "run"]
    assert {run["run_id"] for run in runs} == {first["wandb"]["id"]}
    assert {run["display_name"] for run in runs} == {"resumed"}
    # The killed session's wandb-core died with it, maybe before writing any of its records: those up to the
    # checkpoint (1, 2) are sent again from metrics.jsonl, and 3 and 4 come again with the steps repeated.
    assert [step for step, _ in wandb_history(sessions[1], "loss")] == [1, 2, 3, 4, 5, 6]
    assert_same_series(wandb_history(sessions[1], "loss"), jsonl(run_dir, "loss"), "loss")
    assert "held_through" not in first["wandb"]  # killed: W&B was never closed
    assert json.loads((run_dir / "trackers.json").read_text())["wandb"]["held_through"] == 6


# ----------------------------------------------------------------------------- refusals and failures


@pytest.mark.parametrize("override, missing, message", [
    ("logging.wandb.mode=offline", "wandb", 'logging.wandb needs the wandb library: pip install -e ".[wandb]"'),
    ("logging.mlflow={}", "mlflow", 'logging.mlflow needs the mlflow library: pip install -e ".[mlflow]"'),
    ("logging.mlflow={}", "sqlalchemy", 'logging.mlflow needs the sqlalchemy library: pip install -e ".[mlflow]"'),
])
def test_a_tracker_without_its_library_is_refused_before_anything_starts(override, missing, message, tmp_path,
                                                                         monkeypatch):
    from jaxgen.train.loop import train as train_in_process

    monkeypatch.setitem(sys.modules, missing, None)  # `import` then fails as for a library not installed
    with pytest.raises(ConfigError) as refused:
        train_in_process(tiny_config(override), tmp_path / "run")
    assert str(refused.value) == message
    assert not (tmp_path / "run").exists()


def test_a_tracker_that_cannot_start_is_refused_before_the_compile_and_leaves_no_run_directory(tmp_path):
    """An MLflow tracking_uri of no store (or W&B online without a key) was named after the compile, which can
    take minutes, and left a run directory holding config.yaml, which a later start then read."""
    from jaxgen.train.loop import train as train_in_process

    with pytest.raises(ConfigError, match=r"^logging.mlflow: could not open a run at tracking_uri 'bogus://x': "):
        train_in_process(tiny_config("logging.mlflow={tracking_uri: 'bogus://x'}"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_resume_whose_tracker_settings_changed_says_that_a_new_run_is_opened(tmp_path, caplog):
    """A resumed run given another MLflow tracking_uri opened a new MLflow run without a word of it."""
    from jaxgen.config import MlflowConfig
    from jaxgen.trackers import MlflowTracker

    stored = {"tracking_uri": f"sqlite:///{tmp_path}/old.db", "experiment": "jaxgen", "run_id": "abc"}
    with caplog.at_level(logging.WARNING, logger="jaxgen"):
        tracker = MlflowTracker(MlflowConfig(tracking_uri=f"sqlite:///{tmp_path}/new.db"), tmp_path, {}, stored)
    tracker.close("finished")
    assert not tracker.continued
    assert caplog.messages == [
        f"logging.mlflow: this run's MLflow run was at tracking_uri 'sqlite:///{tmp_path}/old.db', experiment "
        f"'jaxgen', and is now set to tracking_uri 'sqlite:///{tmp_path}/new.db', experiment 'jaxgen': a new MLflow "
        "run is opened there, and the steps logged so far stay in the earlier one"]


def test_trackers_are_off_unless_configured(tmp_path):
    from jaxgen.trackers import open_trackers

    assert not open_trackers(tiny_config(), tmp_path, resumed_at=None)
    assert not (tmp_path / "trackers.json").exists()


class FakeTracker:
    continued, durable = False, True

    def __init__(self, name: str, fails: bool = False):
        self.name, self.fails, self.calls = name, fails, []

    def log_scalars(self, step, values):
        self.record("scalars", step, values)

    def log_image(self, step, name, png):
        self.record("image", step, name, png.name)

    def close(self, outcome):
        self.record("close", outcome)

    def record(self, *call):
        if self.fails:
            raise ConnectionError("tracking server unreachable")
        self.calls.append(call)


def test_a_failing_tracker_warns_once_and_the_others_go_on(tmp_path, caplog):
    broken, working = FakeTracker("mlflow", fails=True), FakeTracker("wandb")
    writer = MetricsWriter(tmp_path, tensorboard=False, resumed_at=None, trackers=Trackers([broken, working]))
    with caplog.at_level(logging.WARNING, logger="jaxgen"), writer:
        writer.write(1, {"loss": 2.0, "skipped_loss": float("nan")})  # a skipped step's loss stays out
        writer.write(2, {"loss": 1.5})
        writer.log_pictures(2, {"samples": str(tmp_path / "samples" / "final.png"), "sample": "And God said"})
    assert working.calls == [("scalars", 1, {"loss": 2.0}), ("scalars", 2, {"loss": 1.5}),
                             ("image", 2, "samples", "final.png"), ("close", "finished")]
    [warning] = [r.getMessage() for r in caplog.records]
    assert warning == "logging.mlflow failed (tracking server unreachable); training goes on without it"


class LateTracker(FakeTracker):
    """A tracker that stores what it is sent late (as W&B's wandb-core), whose server holds steps below `next`."""

    continued, durable = True, False

    def __init__(self, name: str, next_step: int = 0):
        super().__init__(name)
        self.next = next_step
        self.where = {"id": "abc"}

    def next_step(self):
        return self.next


RECORDS = [{"step": step, "loss": 10.0 - step, "eval_loss": None} for step in range(0, 12, 2)]


@pytest.mark.parametrize("held_through, next_step, sent", [
    (None, 0, [0, 2, 4, 6]),  # never closed cleanly, offline: every record up to the checkpoint
    (2, 0, [4, 6]),  # closed cleanly at step 2 by an earlier session: what came after
    (2, 6, [6]),  # an online server holds steps below 6
    (6, 0, []),  # the killed session was a clean one's continuation at the checkpoint: nothing
])
def test_a_tracker_that_stores_late_gets_a_killed_session_s_records_again(held_through, next_step, sent, tmp_path):
    """W&B offline after a kill -9: the killed session's wandb-core died with it before writing its records up
    to the checkpoint resumed from, and the resumed session sent only the steps after the checkpoint: the
    checkpoint's own step (and those before it the killed session had not written) were never in W&B."""
    tracker = LateTracker("wandb", next_step)
    trackers = Trackers([tracker], state_path=tmp_path / "trackers.json",
                        held_through={} if held_through is None else {"wandb": held_through})
    trackers.send_again(tracker, RECORDS, through=6)
    assert tracker.calls == [("scalars", step, {"loss": 10.0 - step}) for step in sent]
    trackers.log_scalars(8, {"loss": 2.0})
    trackers.close("finished")
    assert json.loads((tmp_path / "trackers.json").read_text()) == {"wandb": {"id": "abc", "held_through": 8}}


def test_trackers_learn_how_the_run_ended(tmp_path):
    from jaxgen.errors import Preempted

    for error, outcome in ((Preempted(4), "preempted"), (RuntimeError("boom"), "failed")):
        tracker = FakeTracker("wandb")
        with pytest.raises(type(error)), MetricsWriter(tmp_path, False, None, Trackers([tracker])):
            raise error
        assert tracker.calls == [("close", outcome)]


def test_config_is_flattened_as_trackers_list_hyperparameters():
    assert flatten({"optimizer": {"lr": 0.01, "betas": [0.9, 0.95]}, "mesh": {}, "seed": 0}) == {
        "optimizer.lr": 0.01, "optimizer.betas": [0.9, 0.95], "mesh": {}, "seed": 0}


def test_an_mlflow_server_that_refuses_the_connection_is_named_at_once(monkeypatch):
    """MLflow's client retried an unreachable tracking_uri for about four minutes before the run failed."""
    from jaxgen.trackers import refuse_unreachable

    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"^logging.mlflow: tracking_uri 'http://127.0.0.1:1' cannot be reached "
                                          r"\(Connection refused\); start the MLflow server there"):
        refuse_unreachable("http://127.0.0.1:1")
    assert time.monotonic() - start < 5
    refuse_unreachable("sqlite:///runs/mlflow.db")  # local stores are not probed


def test_a_local_mlflow_store_that_cannot_be_used_is_named_at_once(tmp_path):
    """A text file as the SQLite store, a store under a file, a file as a file: store: SQLAlchemy's words
    (`unexpected DatabaseError: file is not a database`), some after minutes of MLflow's retries."""
    import sqlite3

    from jaxgen.trackers import refuse_unusable_local_store

    (tmp_path / "notes").write_text("mine")
    sqlite3.connect(tmp_path / "kept.db").execute("create table t (x)").connection.close()
    refused = {
        f"sqlite:///{tmp_path}/notes": f"'{tmp_path}/notes': file is not a database",
        f"sqlite:///{tmp_path}/notes/mlflow.db": f"'{tmp_path}/notes' is not a directory",
        f"sqlite:///{tmp_path}": f"'{tmp_path}' is a directory; an SQLite store is a file",
        f"file:{tmp_path}/notes": f"'{tmp_path}/notes' is a file; a file: store is a directory",
    }
    for uri, why in refused.items():
        with pytest.raises(ConfigError) as refusal:
            refuse_unusable_local_store(uri)
        assert str(refusal.value) == (f"logging.mlflow: tracking_uri {uri!r} cannot be used: {why}; give another, or "
                                      "leave tracking_uri out for RUN_DIR/mlflow.db")
    for usable in (f"sqlite:///{tmp_path}/kept.db", f"sqlite:///{tmp_path}/new/dirs/mlflow.db",  # MLflow makes them
                   f"file:{tmp_path}/store", "http://127.0.0.1:5000"):
        refuse_unusable_local_store(usable)
    assert (tmp_path / "notes").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["kept.db",
                                                                                                          "notes"]
