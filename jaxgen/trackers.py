"""Experiment trackers: what a run records, forwarded to Weights & Biases and MLflow.

Off unless `logging.wandb` or `logging.mlflow` is configured; each library is an
optional extra, imported only then. `MetricsWriter` (process 0) forwards every
record of metrics.jsonl to the trackers at the same step, and the pictures (the
loss curve, sample grids) as images; the run's config goes in flattened
(`optimizer.lr`) as the tracker's config or params.

A resumed run continues its tracker runs (their ids are kept in
RUN_DIR/trackers.json); a run that starts over from step 0 opens new ones. The
steps a killed run had sent past its last checkpoint come again (the resumed run
repeats them bit for bit). MLflow stored them at once, so they are not sent
again. W&B keeps the first copy of a step in a resumed online run by itself, and
offline, a hard-killed session may not have written its last records (its
wandb-core process dies with it), so W&B gets them again; so does every record
metrics.jsonl keeps (up to the checkpoint) since the last step a session closed
W&B cleanly at (`held_through` in trackers.json), from the step an online run's
server does not hold yet.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import pathlib
import socket
import time
import urllib.parse
from typing import TYPE_CHECKING, Literal, Protocol

import jax

from jaxgen.errors import EXIT_PREEMPTED, ConfigError, first_line, os_error_words
from jaxgen.files import write_atomic

if TYPE_CHECKING:
    from jaxgen.config import Config, LoggingConfig, MlflowConfig, WandbConfig

log = logging.getLogger("jaxgen")

STATE_FILE = "trackers.json"

# How a run ended, as the trackers record it: a preempted run is a pause that the same command continues.
Outcome = Literal["finished", "preempted", "failed"]


class Tracker(Protocol):
    name: str  # its key under `logging`
    continued: bool  # it continues the tracker run of an earlier start of this run
    durable: bool  # what it is sent is stored at once, so a resumed run need not send it again

    def log_scalars(self, step: int, values: dict[str, float]) -> None: ...

    def log_image(self, step: int, name: str, png: pathlib.Path) -> None: ...

    def close(self, outcome: Outcome) -> None: ...

    def next_step(self) -> int:
        """The first step the tracker's own store is known not to hold yet (0 where it cannot say)."""
        ...


def require_libraries(cfg: LoggingConfig) -> None:
    """Refuse, before any work, a configured tracker whose library is not installed."""
    needed = {}
    if cfg.wandb is not None:
        needed["wandb"] = ["wandb"]
    if cfg.mlflow is not None:
        needed["mlflow"] = ["mlflow", *(["sqlalchemy", "alembic"] if _is_sqlite(cfg.mlflow.tracking_uri) else [])]
    for tracker, modules in needed.items():
        for module in modules:
            try:
                importlib.import_module(module)
            except ImportError:
                raise ConfigError(f'logging.{tracker} needs the {module} library: pip install -e ".[{tracker}]"') \
                    from None


def open_trackers(cfg: Config, run_dir: pathlib.Path, resumed_at: int | None) -> Trackers:
    """The trackers `cfg.logging` names, opened on process 0 (none elsewhere).

    Call it before `MetricsWriter` drops a killed run's records: they tell which
    steps the continued tracker runs already hold.
    """
    if jax.process_index() != 0 or (cfg.logging.wandb is None and cfg.logging.mlflow is None):
        return Trackers([])
    state_path = run_dir / STATE_FILE
    stored = json.loads(state_path.read_text()) if resumed_at is not None and state_path.exists() else {}
    params = flatten(cfg.model_dump(mode="json"))
    trackers: list[Tracker] = []
    try:
        if cfg.logging.wandb is not None:
            trackers.append(WandbTracker(cfg.logging.wandb, run_dir, params, stored.get("wandb")))
        if cfg.logging.mlflow is not None:
            trackers.append(MlflowTracker(cfg.logging.mlflow, run_dir, params, stored.get("mlflow")))
    except ConfigError:
        Trackers(trackers).close("failed")  # the ones already open
        raise
    from jaxgen.metrics import read_metrics

    records = read_metrics(run_dir / "metrics.jsonl")
    sent_through = max((r["step"] for r in records), default=-1)
    held = {t.name: stored[t.name]["held_through"] for t in trackers
            if t.continued and not t.durable and isinstance(stored[t.name].get("held_through"), int)}
    opened = Trackers(trackers, {t.name: sent_through for t in trackers if t.continued and t.durable}, state_path,
                      held)
    opened.save_state()
    for tracker in trackers:
        if tracker.continued and not tracker.durable:
            opened.send_again(tracker, records, through=resumed_at)
    return opened


class Trackers:
    """The open trackers as one; a tracker that fails says so once, and training goes on without it."""

    def __init__(self, trackers: list[Tracker], sent_through: dict[str, int] | None = None,
                 state_path: pathlib.Path | None = None, held_through: dict[str, int] | None = None):
        self.trackers = trackers
        self._sent_through = sent_through or {}  # per continued tracker: the last step it already holds
        self._failed: set[str] = set()
        self._state_path = state_path
        # Per tracker: the last step a session sent it and then closed it cleanly (its store holds everything
        # up to there), and the last step this session sent it.
        self._held_through = dict(held_through or {})
        self._sent: dict[str, int] = {}

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def log_scalars(self, step: int, values: dict[str, float]) -> None:
        for tracker in self._working():
            if step > self._sent_through.get(tracker.name, -1):
                self._send(tracker, step, values)

    def send_again(self, tracker: Tracker, records: list[dict], through: int) -> None:
        """To a continued tracker that stores what it is sent late (W&B), the records of metrics.jsonl a killed
        session may have sent it without its store keeping them: those after the last step a session closed it
        cleanly at, and that its store does not hold, through step `through` (the checkpoint resumed from)."""
        start = max(self._held_through.get(tracker.name, -1) + 1, self._ask(tracker, tracker.next_step, 0))
        again = [r for r in records if start <= r["step"] <= through]
        if again:
            log.info("logging.%s: sending steps %d-%d again (%d records): the session that sent them was killed "
                     "before closing it, and its store may not have kept them", tracker.name, again[0]["step"],
                     again[-1]["step"], len(again))
        for record in again:
            if tracker.name not in self._failed:
                self._send(tracker, record["step"], {key: value for key, value in record.items() if key != "step"
                                                     and isinstance(value, (int, float)) and not isinstance(value, bool)})

    def _send(self, tracker: Tracker, step: int, values: dict[str, float]) -> None:
        self._call(tracker, tracker.log_scalars, step, values)
        self._sent[tracker.name] = max(step, self._sent.get(tracker.name, -1))

    def log_image(self, step: int, name: str, png: pathlib.Path) -> None:
        for tracker in self._working():
            self._call(tracker, tracker.log_image, step, name, png)

    def close(self, outcome: Outcome) -> None:
        for tracker in self.trackers:  # one that failed too: W&B still finishes what it has on disk
            closed = self._call(tracker, tracker.close, outcome)
            if closed and not tracker.durable and tracker.name not in self._failed:
                self._held_through[tracker.name] = max(self._held_through.get(tracker.name, -1),
                                                       self._sent.get(tracker.name, -1))
        self.save_state()

    def save_state(self) -> None:
        """trackers.json: where each tracker's run is (a resumed run continues it), and the step its store is
        known to hold everything up to."""
        if self._state_path is None or not self.trackers:
            return
        state = {t.name: {**t.where, **({"held_through": self._held_through[t.name]}
                                        if t.name in self._held_through else {})} for t in self.trackers}
        try:
            write_atomic(self._state_path, json.dumps(state, indent=2) + "\n")
        except OSError as err:  # at close: the records are safe, only what a resume sends again is more
            log.warning("could not write %s (%s)", self._state_path, first_line(err))

    def _working(self) -> list[Tracker]:
        return [tracker for tracker in self.trackers if tracker.name not in self._failed]

    def _call(self, tracker: Tracker, method, *args) -> bool:
        """`method(*args)`; False where it failed (said once)."""
        try:
            method(*args)
            return True
        except Exception as err:  # noqa: BLE001 -- an unreachable tracker server must not cost the training run
            if tracker.name not in self._failed:
                log.warning("logging.%s failed (%s); training goes on without it", tracker.name, first_line(err))
            self._failed.add(tracker.name)
            return False

    def _ask(self, tracker: Tracker, method, otherwise):
        try:
            return method()
        except Exception:  # noqa: BLE001 -- what cannot be asked is sent again
            return otherwise


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"optimizer": {"lr": 0.01}} -> {"optimizer.lr": 0.01}: the config as trackers list hyperparameters."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def moved(name: str, before: str, now: str, tracker: str) -> None:
    """A resumed run whose tracker settings changed: it cannot continue the tracker's run, and says so."""
    log.warning("logging.%s: this run's %s run was at %s, and is now set to %s: a new %s run is opened there, and "
                "the steps logged so far stay in the earlier one", name, tracker, before, now, tracker)


class WandbTracker:
    """A W&B run; its files (offline too) under RUN_DIR/wandb."""

    name, durable = "wandb", False

    def __init__(self, cfg: WandbConfig, run_dir: pathlib.Path, params: dict, stored: dict | None):
        import wandb

        self.continued = bool(stored and stored.get("project") == cfg.project)
        if stored and not self.continued:
            moved(self.name, f"project {stored.get('project')!r}", f"project {cfg.project!r}", "W&B")
        try:
            self.run = wandb.init(project=cfg.project, name=cfg.name or run_dir.absolute().name, mode=cfg.mode,
                                  dir=str(run_dir.absolute()), config=params,
                                  **({"id": stored["id"], "resume": "allow"} if self.continued else {}))
        except Exception as err:
            raise ConfigError(f"logging.wandb: could not start a W&B run: {first_line(err)}") from err
        self.where = {"project": cfg.project, "id": self.run.id}

    def log_scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def log_image(self, step: int, name: str, png: pathlib.Path) -> None:
        import wandb

        self.run.log({name: wandb.Image(str(png))}, step=step)

    def next_step(self) -> int:
        # Online, the W&B step of the next log is the server's (a resumed run's history goes on from there);
        # offline there is no server to ask.
        return 0 if self.run.offline else int(self.run.step)

    def close(self, outcome: Outcome) -> None:
        if outcome == "preempted":
            self.run.mark_preempting()
        self.run.finish(exit_code={"finished": 0, "preempted": EXIT_PREEMPTED, "failed": 1}[outcome])


def _is_sqlite(tracking_uri: str | None) -> bool:
    return tracking_uri is None or tracking_uri.startswith("sqlite:")  # None: the default, RUN_DIR/mlflow.db


def refuse_unreachable(uri: str, timeout_s: float = 10.0) -> None:
    """An MLflow server that refuses the connection, named at once: MLflow's client retries for minutes first.
    Not where a proxy is configured, which may reach what this host cannot."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme not in ("http", "https") or not parsed.hostname or any(
            os.environ.get(name) for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")):
        return
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=timeout_s).close()
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise ConfigError(f"logging.mlflow: tracking_uri {uri!r} cannot be reached ({reason}); start the MLflow "
                          "server there, or give one that runs") from None


def refuse_unusable_local_store(uri: str) -> None:
    """A local store MLflow cannot open, named at once: a file that is no SQLite database, a directory where a file
    belongs (or the reverse), or one it cannot create, failed with SQLAlchemy's words, some after minutes of
    MLflow's retries."""
    parsed = urllib.parse.urlparse(uri)
    why = None
    if parsed.scheme == "sqlite" and uri.startswith("sqlite:///"):
        path = pathlib.Path(uri.removeprefix("sqlite:///").split("?")[0])  # sqlite:////abs/x.db -> /abs/x.db
        if path.is_dir():
            why = f"{str(path)!r} is a directory; an SQLite store is a file"
        elif path.exists():
            why = _sqlite_problem(path)
        else:
            why = _unwritable_directory(path.parent)
    elif parsed.scheme in ("", "file") and parsed.path:
        path = pathlib.Path(parsed.path)
        why = (f"{str(path)!r} is a file; a file: store is a directory" if path.exists() and not path.is_dir()
               else None if path.exists() else _unwritable_directory(path.parent))
    if why:
        raise ConfigError(f"logging.mlflow: tracking_uri {uri!r} cannot be used: {why}; give another, or leave "
                          "tracking_uri out for RUN_DIR/mlflow.db")


def _sqlite_problem(path: pathlib.Path) -> str | None:
    import sqlite3

    try:
        connection = sqlite3.connect(f"file:{path}?mode=rw", uri=True)  # never creates: it exists
        try:
            connection.execute("pragma schema_version").fetchall()
        finally:
            connection.close()
    except sqlite3.Error as err:
        return f"{str(path)!r}: {err}"
    return None


def _unwritable_directory(directory: pathlib.Path) -> str | None:
    """Why a new store cannot be made in `directory`, which MLflow creates where it is missing, or None."""
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    if not directory.is_dir():
        return f"{str(directory)!r} is not a directory"
    import tempfile

    try:
        tempfile.TemporaryFile(dir=directory).close()
    except OSError as err:
        return f"no file can be made in {str(directory)!r} ({os_error_words(err.errno) or err.strerror})"
    return None


class MlflowTracker:
    """An MLflow run: scalars as metrics, pictures as step images, the config as params."""

    name, durable = "mlflow", True

    def __init__(self, cfg: MlflowConfig, run_dir: pathlib.Path, params: dict, stored: dict | None):
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        uri = cfg.tracking_uri or f"sqlite:///{(run_dir / 'mlflow.db').absolute()}"
        refuse_unreachable(uri)
        refuse_unusable_local_store(uri)
        if urllib.parse.urlparse(uri).scheme in ("", "file"):
            # MLflow 3 keeps its file store behind an opt-in; configuring a file: URI is that opt-in.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.continued = bool(stored and stored.get("tracking_uri") == uri and stored.get("experiment") == cfg.experiment)
        if stored and not self.continued:
            moved(self.name, f"tracking_uri {stored.get('tracking_uri')!r}, experiment {stored.get('experiment')!r}",
                  f"tracking_uri {uri!r}, experiment {cfg.experiment!r}", "MLflow")
        try:
            self.client = MlflowClient(uri)
            if self.continued:
                try:
                    run = self.client.get_run(stored["run_id"])
                except MlflowException as err:  # the store was emptied: start a new run in it
                    if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                        raise
                    self.continued = False
                else:
                    self.client.update_run(run.info.run_id, status="RUNNING")
            if not self.continued:
                experiment = self.client.get_experiment_by_name(cfg.experiment)
                experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(
                    cfg.experiment, artifact_location=_artifact_location(uri))
                run = self.client.create_run(experiment_id, run_name=run_dir.absolute().name)
        except MlflowException as err:
            raise ConfigError(f"logging.mlflow: could not open a run at tracking_uri {uri!r}: {first_line(err)}") \
                from err
        self.run_id = run.info.run_id
        self.where = {"tracking_uri": uri, "experiment": cfg.experiment, "run_id": self.run_id}
        self._log_params(params, run.data.params)

    def _log_params(self, params: dict, logged: dict[str, str]) -> None:
        """Params are fixed once logged (MLflow refuses changes): a resumed run adds only new keys."""
        from mlflow.entities import Param

        params = {key: str(value) for key, value in params.items()}
        changed = sorted(key for key in params.keys() & logged.keys() if params[key] != logged[key])
        if changed:
            log.warning("logging.mlflow: the run keeps its first values of %s (MLflow params cannot change)",
                        ", ".join(changed))
        self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in params.items() if k not in logged])

    def log_scalars(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(key, value, now, step) for key, value in values.items()])

    def log_image(self, step: int, name: str, png: pathlib.Path) -> None:
        from PIL import Image

        with Image.open(png) as image:
            self.client.log_image(self.run_id, image.copy(), key=name, step=step)

    def next_step(self) -> int:
        return 0  # never asked: a durable tracker is not sent anything again

    def close(self, outcome: Outcome) -> None:
        self.client.set_terminated(self.run_id, {"finished": "FINISHED", "preempted": "KILLED", "failed": "FAILED"}[outcome])


def _artifact_location(uri: str) -> str | None:
    """Beside a local SQLite store (MLflow's own default is ./mlruns under the working directory)."""
    if not uri.startswith("sqlite:///"):
        return None
    return (pathlib.Path(uri.removeprefix("sqlite:///")).absolute().parent / "mlartifacts").as_uri()
