"""An exclusive, expiring lease per Ray experiment: one pipeline run at a time writes into it.

Experiment names are deterministic (data version + tune config hash): that is what lets a retried or
re-run stage resume, and also what made two runs started together write into the same experiment.
The lease is a small JSON record at ``<root>/leases/<experiment>.json`` that is only ever changed by
compare-and-swap, so two runs can never both believe they hold it:

* on S3: PutObject with ``If-None-Match: *`` to create it and ``If-Match: <etag>`` to renew, release
  or take it over. AWS S3, moto 5.2 and SeaweedFS 4.48 honour both (checked with 8 writers racing);
  a server that ignores them is detected once per bucket and refused (``StorageError``), because a
  lease it cannot enforce would be a false promise;
* on a local folder: a new record is written to a temporary file and hard-linked into place (fails
  if one exists, like ``O_CREAT|O_EXCL``, but the record appears whole); a change is compared and
  renamed into place while holding an ``flock`` on a sidecar lock file. The tag is the content hash.

The holder renews its record from a background thread every ``ttl/3`` (heartbeat). Another run may
take the lease over when the record says released, when its expiry has passed, when that run has
seen the record unchanged for a whole TTL (which holds whatever the clocks say), or at once when the
holder is a process of this machine that no longer exists (a SIGKILLed run, rerun by hand). A holder
re-enters its own lease: nested ``with`` blocks of one flow run, and a record left behind by an
earlier attempt in this same process.

A run that finds the lease held waits up to ``wait_s`` (logging who holds it), then raises
``ExperimentBusy`` (the CLI's exit code 3).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from infra.settings import Settings
from infra.storage import Storage, boto3_client, redact, split_s3_uri
from tuning_core.errors import ExperimentBusy, StorageError, TunepipeError, storage_failure

log = logging.getLogger(__name__)

LEASES = "leases"


# --------------------------------------------------------------------------- who holds it


def _machine() -> tuple[str, str, str]:
    """(host name, kernel boot id, pid namespace): where a pid means this machine's process."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot_id = f.read().strip()
        pid_ns = os.readlink("/proc/self/ns/pid")
    except OSError:  # not Linux: pids cannot be compared safely, so holders are never judged gone
        boot_id = pid_ns = ""
    return socket.gethostname(), boot_id, pid_ns


@dataclass(frozen=True)
class Holder:
    """Who holds (or wants) a lease.

    ``boot_id``, ``pid_ns`` and ``started_at`` make a pid meaningful: only on the same kernel boot and
    in the same pid namespace does a pid name a process we can look at, and a reused pid has another
    start time.
    """

    host: str
    pid: int
    flow_run_id: str | None
    token: str
    boot_id: str = ""
    pid_ns: str = ""
    started_at: float = 0.0

    @classmethod
    def this_process(cls, flow_run_id: str | None = None) -> Holder:
        import psutil

        # One token per process and flow run: a retry of the same flow run in this process is the same holder.
        key = (os.getpid(), flow_run_id)
        with _LOCK:
            token = _TOKENS.setdefault(key, uuid.uuid4().hex)
        host, boot_id, pid_ns = _machine()
        return cls(host=host, pid=os.getpid(), flow_run_id=flow_run_id, token=token, boot_id=boot_id,
                   pid_ns=pid_ns, started_at=psutil.Process().create_time())

    def describe(self) -> str:
        run = f"flow run {self.flow_run_id}" if self.flow_run_id else "a run"
        return f"{run} on host {self.host}, pid {self.pid}"

    def same_process(self, other: Holder) -> bool:
        return (self.host, self.pid, self.boot_id, self.pid_ns, round(self.started_at, 1)) == (
            other.host, other.pid, other.boot_id, other.pid_ns, round(other.started_at, 1))

    def gone(self) -> bool:
        """True only when this is provably no longer a running process: same machine, same pid
        namespace, and its pid is free, a zombie, or a different (newer) process."""
        import psutil

        if not (self.boot_id and self.pid_ns) or (self.host, self.boot_id, self.pid_ns) != _machine():
            return False
        try:
            proc = psutil.Process(self.pid)
            return proc.status() == psutil.STATUS_ZOMBIE or abs(proc.create_time() - self.started_at) > 1.0
        except psutil.NoSuchProcess:
            return True
        except psutil.Error:
            return False


_LOCK = threading.Lock()
_TOKENS: dict[tuple[int, str | None], str] = {}
# Tokens that this process holds or is acquiring right now, by lease key; a record of this process
# whose token is not here was left by an earlier attempt and may be taken back.
_LIVE: dict[str, set[str]] = {}
_HELD: dict[tuple[str, str], ExperimentLease] = {}  # (lease key, token) → the outermost lease


# --------------------------------------------------------------------------- where the record lives


class LeaseStore(Protocol):
    """Compare-and-swap storage for one lease record. ``tag`` identifies a version of the record."""

    key: str  # unique per lease (for the in-process registry)
    where: str  # URI for messages

    def read(self) -> tuple[dict[str, Any] | None, str | None]: ...

    def create(self, body: bytes) -> str | None:
        """Write the record if none exists; its tag, or None if one exists."""

    def replace(self, body: bytes, tag: str) -> str | None:
        """Write the record if the current one has ``tag``; the new tag, or None if it changed."""


def _parse(body: bytes) -> dict[str, Any]:
    try:
        record = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return {}
    return record if isinstance(record, dict) else {}


class LocalLeaseStore:
    """The record as a file; creation by hard link (exclusive), changes by rename under an flock."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.key = self.where = path
        self._lock_path = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.lock")

    def _fail(self, err: OSError, doing: str) -> TunepipeError:
        return StorageError(f"lease {self.path}: cannot {doing} ({err.strerror or err})")

    def read(self) -> tuple[dict[str, Any] | None, str | None]:
        try:
            with open(self.path, "rb") as f:
                body = f.read()
        except FileNotFoundError:
            return None, None
        except OSError as err:
            raise self._fail(err, "read the lease record") from None
        return _parse(body), hashlib.sha256(body).hexdigest()

    def _temp(self, body: bytes) -> str:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(self.path), prefix=".lease-", suffix=".tmp")
        os.fchmod(fd, 0o644)  # readable by other users' runs on a shared folder (mkstemp makes it 0600)
        with os.fdopen(fd, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def create(self, body: bytes) -> str | None:
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            tmp = self._temp(body)
            try:
                os.link(tmp, self.path)  # atomic and exclusive, and the record appears complete
            except FileExistsError:
                return None
            finally:
                os.unlink(tmp)
        except OSError as err:
            raise self._fail(err, "create the lease record") from None
        return hashlib.sha256(body).hexdigest()

    def replace(self, body: bytes, tag: str) -> str | None:
        try:
            # Read-only is enough for flock, so another user's run can lock a file this one created.
            lock = os.open(self._lock_path, os.O_RDONLY | os.O_CREAT, 0o644)
            try:
                fcntl.flock(lock, fcntl.LOCK_EX)  # released by the kernel even if we are SIGKILLed
                _, current = self.read()
                if current != tag:
                    return None
                os.replace(self._temp(body), self.path)
            finally:
                os.close(lock)
        except OSError as err:
            raise self._fail(err, "update the lease record") from None
        return hashlib.sha256(body).hexdigest()


_CHECKED_BUCKETS: set[tuple[str | None, str]] = set()
_CONFLICT = {"PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "412", "409"}


class S3LeaseStore:
    """The record as an S3 object, changed only with conditional PutObject (If-None-Match / If-Match)."""

    def __init__(self, client: Any, bucket: str, key: str, endpoint: str | None) -> None:
        self.client, self.bucket, self.object_key, self.endpoint = client, bucket, key, endpoint
        self.key = self.where = f"s3://{bucket}/{key}"

    def _fail(self, err: Exception, doing: str) -> TunepipeError:
        text = redact(str(err).splitlines()[0] if str(err) else type(err).__name__)
        return storage_failure(f"lease {self.where}: cannot {doing} ({text})", err)

    @staticmethod
    def _conflict(err: Exception) -> bool:
        response = getattr(err, "response", None) or {}
        code = str(response.get("Error", {}).get("Code", ""))
        status = str(response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        return code in _CONFLICT or status in ("412", "409")

    def read(self) -> tuple[dict[str, Any] | None, str | None]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=self.object_key)
            body = obj["Body"].read()
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None, None
            raise self._fail(err, "read the lease record") from None
        except BotoCoreError as err:
            raise self._fail(err, "read the lease record") from None
        return _parse(body), obj["ETag"]

    def _put(self, body: bytes, doing: str, **condition: str) -> str | None:
        from botocore.exceptions import BotoCoreError, ClientError

        self._check_conditional_writes()
        try:
            out = self.client.put_object(Bucket=self.bucket, Key=self.object_key, Body=body,
                                         ContentType="application/json", **condition)
        except ClientError as err:
            if self._conflict(err):
                return None
            raise self._fail(err, doing) from None
        except BotoCoreError as err:
            raise self._fail(err, doing) from None
        return out["ETag"]

    def create(self, body: bytes) -> str | None:
        return self._put(body, "create the lease record", IfNoneMatch="*")

    def replace(self, body: bytes, tag: str) -> str | None:
        return self._put(body, "update the lease record", IfMatch=tag)

    def _check_conditional_writes(self) -> None:
        """Once per endpoint and bucket: a server that silently ignores the conditions would let two
        runs both "win"; find out with a probe object instead of trusting it."""
        from botocore.exceptions import BotoCoreError, ClientError

        if (self.endpoint, self.bucket) in _CHECKED_BUCKETS:
            return
        probe = f"{self.object_key.rsplit('/', 1)[0]}/.conditional-write-probe-{uuid.uuid4().hex}"
        refused = []
        try:
            self.client.put_object(Bucket=self.bucket, Key=probe, Body=b"1", IfNoneMatch="*")
            for condition in ({"IfNoneMatch": "*"}, {"IfMatch": f'"{"0" * 32}"'}):
                try:
                    self.client.put_object(Bucket=self.bucket, Key=probe, Body=b"2", **condition)
                except ClientError as err:
                    refused.append(self._conflict(err))
                else:
                    refused.append(False)
            with contextlib.suppress(ClientError, BotoCoreError):
                self.client.delete_object(Bucket=self.bucket, Key=probe)
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code", "")
            if code in ("NotImplemented", "InvalidArgument", "InvalidRequest"):
                refused = [False]
            else:
                raise self._fail(err, "write under the storage root") from None
        except BotoCoreError as err:
            raise self._fail(err, "write under the storage root") from None
        if not all(refused):
            raise StorageError(f"lease {self.where}: the S3 endpoint ignores conditional writes (If-None-Match / "
                               "If-Match), so two runs of one experiment could not be kept apart; use a server that "
                               "supports them (AWS S3, SeaweedFS 4.x, MinIO) or a local-folder storage root")
        _CHECKED_BUCKETS.add((self.endpoint, self.bucket))


def _safe_name(experiment: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", experiment)[:200] or "_"


def lease_store(storage: Storage, settings: Settings, experiment: str) -> LeaseStore:
    """Where the lease of ``experiment`` lives under the storage root."""
    name = f"{_safe_name(experiment)}.json"
    if storage.is_s3:
        bucket, prefix = split_s3_uri(storage.uri)
        key = "/".join(p for p in (prefix, LEASES, name) if p)
        return S3LeaseStore(boto3_client(settings), bucket, key, settings.s3_endpoint_url)
    return LocalLeaseStore(os.path.join(storage.root, LEASES, name))


# --------------------------------------------------------------------------- the lease


class ExperimentLease:
    """Exclusive hold of one experiment; a context manager (re-entrant for the same holder).

    Args:
        store: where the record lives (``lease_store``).
        experiment: the experiment's name (messages, record).
        holder: who we are (``Holder.this_process(flow_run_id)``).
        ttl_s: how long a record stays valid without a heartbeat.
        wait_s: how long to wait for a held lease before ``ExperimentBusy``; 0: not at all.
    """

    def __init__(self, store: LeaseStore, experiment: str, holder: Holder, ttl_s: float = 60.0,
                 wait_s: float = 0.0) -> None:
        self.store, self.experiment, self.holder = store, experiment, holder
        self.ttl_s, self.wait_s = float(ttl_s), float(wait_s)
        self.lost = threading.Event()  # set when another run took the lease over from us
        self._tag: str | None = None
        self._acquired_at = 0.0
        self._depth = 0
        self._outer: ExperimentLease | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- records
    def _record(self, state: str, now: float) -> bytes:
        record = {"experiment": self.experiment, "state": state, "holder": asdict(self.holder),
                  "ttl_s": self.ttl_s, "acquired_at": self._acquired_at or now, "renewed_at": now,
                  "expires_at": now + self.ttl_s if state == "held" else now}
        return json.dumps(record, sort_keys=True).encode()

    def _why_free(self, record: dict[str, Any], tag: str, seen: dict[str, float]) -> str | None:
        """Why we may take this record (None: it is validly held by someone else)."""
        if record.get("state") == "released":
            return "released"
        try:
            other = Holder(**record["holder"])
            expires_at = float(record["expires_at"])
        except (KeyError, TypeError, ValueError):
            return "unreadable record"
        if other.token == self.holder.token:
            return "ours"  # an earlier attempt of this flow run in this process
        if other.same_process(self.holder):
            with _LOCK:
                if other.token not in _LIVE.get(self.store.key, set()):
                    return "left by an earlier run of this process"
        if time.time() > expires_at:
            return f"expired {time.time() - expires_at:.0f} s ago"
        if time.monotonic() - seen.setdefault(tag, time.monotonic()) > self.ttl_s:
            return f"not renewed for {self.ttl_s:g} s"
        if other.gone():
            return f"its holder (pid {other.pid} on this host) no longer runs"
        return None

    def _busy(self, record: dict[str, Any], waited: float) -> ExperimentBusy:
        other = Holder(**record["holder"])
        now = time.time()
        waited_text = f" (waited {waited:.0f} s)" if waited else ""
        return ExperimentBusy(
            f"experiment {self.experiment} is busy: its lease is held by {other.describe()}, renewed "
            f"{max(0.0, now - float(record['renewed_at'])):.0f} s ago, expiring in "
            f"{max(0.0, float(record['expires_at']) - now):.0f} s unless renewed ({self.store.where}){waited_text}; "
            "wait for it with --wait-lease SECONDS (TUNEPIPE_LEASE_WAIT_S)")

    # -- acquire / release
    def acquire(self) -> ExperimentLease:
        with _LOCK:
            outer = _HELD.get((self.store.key, self.holder.token))
            if outer is not None:
                outer._depth += 1
                self._outer = outer
                return self
            _LIVE.setdefault(self.store.key, set()).add(self.holder.token)
        try:
            self._take()
        except BaseException:
            with _LOCK:
                _LIVE.get(self.store.key, set()).discard(self.holder.token)
            raise
        with _LOCK:
            _HELD[(self.store.key, self.holder.token)] = self
        self._depth = 1
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat, name=f"lease-{self.experiment}", daemon=True)
        self._thread.start()
        return self

    def _take(self) -> None:
        start = time.monotonic()
        seen: dict[str, float] = {}
        announced = False
        poll = max(0.1, min(2.0, self.ttl_s / 5))
        while True:
            record, tag = self.store.read()
            now = time.time()
            self._acquired_at = now
            if record is None:
                self._tag = self.store.create(self._record("held", now))
                if self._tag:
                    log.info("experiment %s: lease acquired (%s)", self.experiment, self.store.where)
                    return
                continue
            why = self._why_free(record, tag, seen)
            if why is not None:
                self._tag = self.store.replace(self._record("held", now), tag)
                if self._tag:
                    if why not in ("released", "ours"):
                        log.warning("experiment %s: taking over its lease (%s)", self.experiment, why)
                    else:
                        log.info("experiment %s: lease acquired (%s)", self.experiment, self.store.where)
                    return
                continue  # someone else changed it first: look again
            waited = time.monotonic() - start
            if waited >= self.wait_s:
                raise self._busy(record, waited)
            if not announced:
                log.warning("experiment %s is held by %s; waiting up to %.0f s for its lease",
                            self.experiment, Holder(**record["holder"]).describe(), self.wait_s)
                announced = True
            time.sleep(min(poll, self.wait_s - waited))

    def release(self) -> None:
        if self._outer is not None:
            with _LOCK:
                self._outer._depth -= 1
            self._outer = None
            return
        if self._depth == 0:
            return
        self._depth = 0
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with _LOCK:
            _HELD.pop((self.store.key, self.holder.token), None)
        try:
            if self.lost.is_set():
                return
            # The heartbeat thread has ended, so self._tag is the record's latest version.
            if not self.store.replace(self._record("released", time.time()), self._tag or ""):
                log.warning("experiment %s: lease was taken over before it was released", self.experiment)
        except TunepipeError as err:
            # Never mask the run's own outcome: the record simply expires.
            log.warning("experiment %s: lease not released (%s); it expires within %.0f s",
                        self.experiment, err, self.ttl_s)
        finally:
            with _LOCK:
                _LIVE.get(self.store.key, set()).discard(self.holder.token)

    def __enter__(self) -> ExperimentLease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    # -- heartbeat
    def renew(self) -> bool:
        """Push the expiry forward; False if the lease is no longer ours."""
        tag = self.store.replace(self._record("held", time.time()), self._tag or "")
        if tag is None:
            record, current = self.store.read()
            if record and (record.get("holder") or {}).get("token") == self.holder.token \
                    and record.get("state") == "held":
                self._tag = current  # our own write landed but its answer was lost: carry on from it
                return True
            self.lost.set()
            who = Holder(**record["holder"]).describe() if record and record.get("holder") else "nobody"
            log.error("experiment %s: lease lost (now held by %s): this run is no longer the experiment's "
                      "only writer", self.experiment, who)
            return False
        self._tag = tag
        return True

    def _heartbeat(self) -> None:
        interval = self.ttl_s / 3
        while not self._stop.wait(interval):
            try:
                if not self.renew():
                    return
            except TunepipeError as err:
                log.warning("experiment %s: lease not renewed (%s); trying again in %.0f s",
                            self.experiment, err, interval)

    def stop_heartbeat(self) -> None:
        """Stop renewing without releasing (what a killed holder looks like; for tests)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)


def experiment_lease(storage: Storage, settings: Settings, experiment: str,
                     flow_run_id: str | None = None) -> ExperimentLease:
    """The lease of ``experiment`` under ``storage``, with TTL and wait from settings
    (``TUNEPIPE_LEASE_TTL_S``, ``TUNEPIPE_LEASE_WAIT_S``); use it as a ``with`` block."""
    return ExperimentLease(lease_store(storage, settings, experiment), experiment,
                           Holder.this_process(flow_run_id), ttl_s=settings.lease_ttl_s, wait_s=settings.lease_wait_s)
