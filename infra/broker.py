"""A local KRaft Kafka broker, or a local cluster of them, for development and tests.

One node (the default) keeps its files in `var/kafka/`; a cluster (`brokers=3`,
`mallwatt stack up --brokers 3`) runs combined broker+controller nodes, each with its own
folder `var/kafka/node-<id>/` and its own two ports (node k: port + 2(k-1), controller
port + 2(k-1)). The jars come from `infra.kafka_runtime`. Set MALLWATT_KAFKA to the
bootstrap servers of an external cluster and nothing is started or stopped: every caller
just uses that address via `bootstrap_servers()`.

    python -m infra.broker up|down|status [--brokers 3]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from infra import kafka_runtime
from infra.home import data_dir

DEFAULT_DATA_DIR = data_dir("kafka")
DEFAULT_PORT = 19092
# The secured broker (`stack up --secure`) keeps its own files and ports: its storage is
# formatted with the SCRAM users, and both brokers can run side by side.
SECURE_DATA_DIR = data_dir("kafka-secure")
SECURE_PORT = 19192
HOST = "127.0.0.1"
HEAP_OPTS = ("-Xmx512m", "-Xms256m")
# Kafka's own kafka-run-class.sh defaults, minus what a dev box does not need.
JVM_OPTS = (
    "-server",
    # This broker lives for a test run, a demo or a benchmark: C2 compilation then takes CPU
    # from the workers for its whole life (measured: about 30 % of a core during the pipeline
    # benchmark's latency phase, 45 s after start, and 20 % less broker CPU over a bench run
    # without it). A production cluster keeps the JVM's defaults.
    "-XX:TieredStopAtLevel=1",
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-XX:InitiatingHeapOccupancyPercent=35",
    "-XX:+ExplicitGCInvokesConcurrent",
    "-XX:+ExitOnOutOfMemoryError",
    "-Djava.awt.headless=true",
)
_LOG_ROTATE_BYTES = 20 * 1024 * 1024


class BrokerError(RuntimeError):
    """The broker could not be started, stopped or reached."""


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    return int(raw) if raw else default


#: The cluster size of the last `up` in a data dir: `down` and `status` find every node.
BROKERS_FILE = "brokers"
MAX_BROKERS = 9


def recorded_brokers(data_dir: Path) -> int | None:
    """How many nodes the last `up` in `data_dir` started (None: no record)."""
    try:
        return int((data_dir / BROKERS_FILE).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


@dataclass(frozen=True)
class Node:
    """One KRaft node (broker and controller in one JVM) of a local cluster."""

    node_id: int
    data_dir: Path
    port: int
    controller_port: int

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "data"

    @property
    def properties_file(self) -> Path:
        return self.data_dir / "server.properties"

    @property
    def pid_file(self) -> Path:
        return self.data_dir / "broker.pid"

    @property
    def broker_log(self) -> Path:
        return self.data_dir / "broker.log"


@dataclass(frozen=True)
class BrokerConfig:
    """Where a local broker keeps its files and which ports it binds.

    `external` is the MALLWATT_KAFKA address; when set, this config never starts a
    process. Construct directly for a private broker (tests), or via `from_env()` for
    the shared dev broker.
    """

    data_dir: Path = DEFAULT_DATA_DIR
    port: int = DEFAULT_PORT
    controller_port: int | None = None  # default: port + 1
    num_partitions: int = 8
    external: str | None = None
    heap_opts: tuple[str, ...] = field(default=HEAP_OPTS)
    secure: bool = False  # SASL_SSL listener, SCRAM users, ACLs (infra/kafka_security.py)
    brokers: int = 1  # nodes of the local cluster (1: the single dev broker, files in data_dir)

    def __post_init__(self) -> None:
        if not 1 <= self.brokers <= MAX_BROKERS:
            raise BrokerError(f"brokers: expected 1..{MAX_BROKERS} nodes, got {self.brokers}")
        if self.secure and self.brokers > 1:
            raise BrokerError("the secured local broker (--secure) runs one node only; "
                              "a secured cluster is an external one (MALLWATT_KAFKA)")
        ports = [p for n in self.nodes() for p in (n.port, n.controller_port)]
        if len(set(ports)) != len(ports):
            raise BrokerError(f"the nodes' ports overlap: {ports} (port {self.port}, controller port "
                              f"{self.ctrl_port}; node k uses both + 2(k-1))")

    def nodes(self) -> list[Node]:
        """The local nodes: one in data_dir itself, or node-<id> folders for a cluster."""
        if self.brokers == 1:
            return [Node(1, self.data_dir, self.port, self.ctrl_port)]
        return [Node(i, self.data_dir / f"node-{i}", self.port + 2 * (i - 1), self.ctrl_port + 2 * (i - 1))
                for i in range(1, self.brokers + 1)]

    def node(self, node_id: int) -> Node:
        for n in self.nodes():
            if n.node_id == node_id:
                return n
        raise BrokerError(f"no node {node_id} in a cluster of {self.brokers}")

    @classmethod
    def from_env(cls, **overrides: object) -> BrokerConfig:
        secure = bool(overrides.get("secure")) or os.environ.get("MALLWATT_KAFKA_SECURE", "") == "1"
        port = _env_int("MALLWATT_KAFKA_PORT", SECURE_PORT if secure else DEFAULT_PORT)
        data_dir = os.environ.get("MALLWATT_KAFKA_DATA_DIR")
        values: dict[str, object] = {
            "secure": secure,
            "data_dir": Path(data_dir).expanduser() if data_dir else SECURE_DATA_DIR if secure else DEFAULT_DATA_DIR,
            "port": port,
            "controller_port": _env_int("MALLWATT_KAFKA_CONTROLLER_PORT", port + 1),
            "num_partitions": _env_int("MALLWATT_PARTITIONS", 8),
            "external": os.environ.get("MALLWATT_KAFKA") or None,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        if overrides.get("brokers") is None:  # env, else what the last `up` in this data dir started
            values["brokers"] = (_env_int("MALLWATT_KAFKA_BROKERS", 0)
                                 or recorded_brokers(Path(values["data_dir"])) or 1)  # type: ignore[arg-type]
        return cls(**values)  # type: ignore[arg-type]

    @property
    def ctrl_port(self) -> int:
        return self.controller_port if self.controller_port is not None else self.port + 1

    @property
    def bootstrap(self) -> str:
        return self.external or ",".join(n.address for n in self.nodes())

    def admin_settings(self) -> Any:
        """The connection settings this module's own admin calls use (the admin principal on
        a secured broker; the environment's settings otherwise)."""
        from infra.kafka_security import (
            SASL_SSL,
            KafkaSettings,
            credentials_file,
            ensure_credentials,
        )

        if not self.secure:
            return KafkaSettings.from_env(self.bootstrap)
        password = ensure_credentials(self.data_dir)["admin"]
        ca = credentials_file(self.data_dir, "admin").parent.parent / "ca.pem"
        return KafkaSettings(self.bootstrap, SASL_SSL, "admin", password, str(ca))

    # the first node's files (the single broker's)
    @property
    def log_dir(self) -> Path:
        return self.nodes()[0].log_dir

    @property
    def properties_file(self) -> Path:
        return self.nodes()[0].properties_file

    @property
    def pid_file(self) -> Path:
        return self.nodes()[0].pid_file

    @property
    def broker_log(self) -> Path:
        return self.nodes()[0].broker_log

    @property
    def cluster_id_file(self) -> Path:
        return self.data_dir / "cluster.id"


@dataclass(frozen=True)
class BrokerStatus:
    running: bool
    pid: int | None
    bootstrap: str
    topics: int | None  # None when the broker does not answer
    external: bool
    data_dir: str | None
    nodes: list[dict[str, Any]] = field(default_factory=list)  # per local node: id, port, pid, running


def bootstrap_servers(config: BrokerConfig | None = None) -> str:
    """The bootstrap address every mallwatt component should use."""
    return (config or BrokerConfig.from_env()).bootstrap


# --- files -------------------------------------------------------------------------


def server_properties(config: BrokerConfig, node: Node | None = None) -> str:
    from infra.topics import cluster_replication

    node = node or config.nodes()[0]
    p, c = node.port, node.controller_port
    # Replication of Kafka's own topics (consumer offsets, transaction state) and the default of
    # every topic: infra.topics.cluster_replication, the one place topic settings come from.
    # One node: every internal topic must fit on it, or transactions and consumer groups hang
    # waiting for replicas that will never exist. Three: RF 3, min ISR 2.
    rf, min_isr = cluster_replication(config.brokers)
    lines = {
        "process.roles": "broker,controller",
        "node.id": str(node.node_id),
        "controller.quorum.voters": ",".join(f"{n.node_id}@{HOST}:{n.controller_port}" for n in config.nodes()),
        "listeners": f"PLAINTEXT://{HOST}:{p},CONTROLLER://{HOST}:{c}",
        "advertised.listeners": f"PLAINTEXT://{HOST}:{p}",
        "inter.broker.listener.name": "PLAINTEXT",
        "controller.listener.names": "CONTROLLER",
        "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        "log.dirs": str(node.log_dir),
        "num.partitions": str(config.num_partitions),
        "offsets.topic.replication.factor": str(rf),
        "transaction.state.log.replication.factor": str(rf),
        "transaction.state.log.min.isr": str(min_isr),
        "default.replication.factor": str(rf),
        "min.insync.replicas": str(min_isr),
        "group.initial.rebalance.delay.ms": "0",
        # Topics are declared in infra/topics.py; a typo must fail, not create a topic.
        "auto.create.topics.enable": "false",
        "unclean.leader.election.enable": "false",
        "num.network.threads": "2",
        "num.io.threads": "4",
        "log.retention.check.interval.ms": "300000",
    }
    if config.secure:
        from infra.kafka_security import broker_properties

        lines.update(broker_properties(config.data_dir, HOST, p, c))
    header = "# Generated by infra/broker.py on every start; edit the code, not this file.\n"
    return header + "".join(f"{k}={v}\n" for k, v in lines.items())


def _new_cluster_id() -> str:
    # Same format as Kafka's Uuid.randomUuid(): url-safe base64 of 16 bytes, no padding;
    # Kafka also refuses ids starting with '-' because they look like CLI flags.
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cid.startswith("-"):
            return cid


def _java_cmd(libs: Path, main: str, *args: str, heap: tuple[str, ...] = ()) -> list[str]:
    log4j = kafka_runtime.log4j_config()
    return [
        kafka_runtime.java_executable(),
        *heap,
        *JVM_OPTS,
        *os.environ.get("MALLWATT_KAFKA_JVM_OPTS", "").split(),  # e.g. tuning flags for one bench run
        f"-Dlog4j.configuration=file:{log4j}",
        "-cp",
        f"{libs}/*",
        main,
        *args,
    ]


def _format_storage(config: BrokerConfig, node: Node, libs: Path) -> None:
    """Format a node's storage once, with the cluster id every node of the data dir shares."""
    if (node.log_dir / "meta.properties").exists():
        return
    if config.cluster_id_file.exists():
        cluster_id = config.cluster_id_file.read_text().strip()
    else:
        cluster_id = _new_cluster_id()
        config.cluster_id_file.write_text(cluster_id + "\n")
    cmd = _java_cmd(
        libs, "kafka.tools.StorageTool", "format", "-t", cluster_id,
        "-c", str(node.properties_file), "--ignore-formatted",
    )  # fmt: skip
    if config.secure:
        from infra.kafka_security import scram_format_args

        cmd += scram_format_args(config.data_dir)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BrokerError(f"kafka storage format of node {node.node_id} failed:\n{proc.stdout}{proc.stderr}")


# --- process -----------------------------------------------------------------------


def _task_state(path: str) -> str:
    try:
        with open(path) as fh:
            return fh.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "X"


def _is_alive(pid: int) -> bool:
    # The JVM's main thread can exit (leader shows "Z") while its other threads are still
    # shutting down, so the process is alive as long as any of its threads is.
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    if any(_task_state(f"/proc/{pid}/task/{t}/stat") not in ("Z", "X") for t in tids):
        return True
    # Reap it if we are its parent (a test that started the broker in-process).
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)
    return False


def _is_our_broker(pid: int, node: Node) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    args = [a.decode(errors="replace") for a in cmdline]
    return "kafka.Kafka" in args and str(node.properties_file) in args


def _read_pid(node: Node) -> int | None:
    """The node's pid, or None; a stale pid file (dead or reused pid) is removed."""
    try:
        pid = int(node.pid_file.read_text().strip())
    except (FileNotFoundError, ValueError):
        node.pid_file.unlink(missing_ok=True)
        return None
    if _is_alive(pid) and _is_our_broker(pid, node):
        return pid
    node.pid_file.unlink(missing_ok=True)
    return None


def _port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _split_bootstrap(bootstrap: str) -> list[tuple[str, int]]:
    out = []
    for part in bootstrap.split(","):
        host, _, port = part.strip().rpartition(":")
        out.append((host or HOST, int(port)))
    return out


def cluster_brokers(bootstrap: str, timeout: float = 5.0, settings: Any = None) -> tuple[int, int] | None:
    """(user topics, brokers registered) of the cluster, or None if it does not answer in time."""
    # librdkafka logs every refused connection; probe the sockets first and ask the open ones.
    reachable = ",".join(f"{h}:{p}" for h, p in _split_bootstrap(bootstrap) if _port_open(h, p))
    if not reachable:
        return None
    from confluent_kafka.admin import AdminClient

    from infra.kafka_security import KafkaSettings

    try:
        conf = (settings or KafkaSettings.from_env(bootstrap)).client_config(**{"bootstrap.servers": reachable})
        md = AdminClient(conf).list_topics(timeout=timeout)
    except Exception:
        return None
    return sum(1 for name in md.topics if not name.startswith("__")), len(md.brokers)


def count_topics(bootstrap: str, timeout: float = 5.0, settings: Any = None) -> int | None:
    """Number of user topics, or None if the cluster does not answer in time."""
    answer = cluster_brokers(bootstrap, timeout, settings)
    return None if answer is None else answer[0]


def _log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def wait_until_ready(config: BrokerConfig, timeout: float = 60.0, pid: int | None = None,
                     pids: dict[int, int] | None = None) -> None:
    """Until the cluster answers with every local node registered (`pids`: node id -> pid of
    the nodes just started; one that dies fails at once, with its log's tail)."""
    watched = dict(pids or {})
    if pid is not None:
        watched[1] = pid
    want = 1 if config.external else config.brokers
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for node_id, node_pid in watched.items():
            if not _is_alive(node_pid):
                log = config.node(node_id).broker_log
                raise BrokerError(f"Kafka node {node_id} exited during startup; tail of {log}:\n" + _log_tail(log))
        answer = cluster_brokers(config.bootstrap, timeout=2.0, settings=config.admin_settings())
        if answer is not None and answer[1] >= want:
            return
        time.sleep(0.3)
    logs = "\n".join(f"--- {n.broker_log}:\n{_log_tail(n.broker_log, 15)}" for n in config.nodes())
    raise BrokerError(f"Kafka at {config.bootstrap} did not answer with {want} broker(s) within {timeout:.0f}s:\n"
                      + logs)


def start(config: BrokerConfig | None = None, timeout: float = 60.0) -> BrokerStatus:
    """Start every node that is not running and wait until the cluster answers. Idempotent."""
    config = config or BrokerConfig.from_env()
    if config.external:
        wait_until_ready(config, timeout=timeout)
        return status(config)
    config.data_dir.mkdir(parents=True, exist_ok=True)
    recorded = recorded_brokers(config.data_dir)
    if recorded is not None and recorded != config.brokers and any(
            _read_pid(n) for n in replace(config, brokers=recorded).nodes()):
        raise BrokerError(f"a {recorded}-node Kafka is running in {config.data_dir}; stop it first "
                          f"(stack down) to start {config.brokers} node(s)")
    (config.data_dir / BROKERS_FILE).write_text(f"{config.brokers}\n")
    started = {n.node_id: pid for n in config.nodes() if (pid := start_node(config, n.node_id, wait=False))}
    try:
        wait_until_ready(config, timeout=timeout, pids=started)
    except BrokerError:
        for node_id, pid in started.items():
            _terminate(pid, grace=10.0)
            config.node(node_id).pid_file.unlink(missing_ok=True)
        raise
    return status(config)


def start_node(config: BrokerConfig, node_id: int, *, wait: bool = True, timeout: float = 60.0) -> int | None:
    """Launch one node's JVM unless it runs; returns the new pid (None: it was running). With
    `wait`, return once the cluster answers with every node registered (a node restarted into
    a running cluster)."""
    node = config.node(node_id)
    node.data_dir.mkdir(parents=True, exist_ok=True)
    if _read_pid(node) is not None:
        return None
    for port in (node.port, node.controller_port):
        if _port_open(HOST, port):
            raise BrokerError(
                f"port {port} is in use by another process (not node {node_id} in {node.data_dir}); "
                "stop it, or choose other ports (MALLWATT_KAFKA_PORT)"
            )
    libs = kafka_runtime.ensure_kafka_jars()
    node.properties_file.write_text(server_properties(config, node))
    node.log_dir.mkdir(parents=True, exist_ok=True)
    _format_storage(config, node, libs)

    log = node.broker_log
    if log.exists() and log.stat().st_size > _LOG_ROTATE_BYTES:
        log.replace(log.with_suffix(".log.1"))
    cmd = _java_cmd(libs, "kafka.Kafka", str(node.properties_file), heap=config.heap_opts)
    cmd.insert(1, f"-Dkafka.logs.dir={node.data_dir}")
    with open(log, "ab") as out:
        out.write(f"\n===== mallwatt: starting node {node_id} {time.strftime('%F %T')} =====\n".encode())
        out.flush()
        # Own session: the broker outlives `python -m infra.broker up` and a Ctrl-C in
        # the caller's terminal does not reach it.
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=node.data_dir,
            start_new_session=True,
        )
    node.pid_file.write_text(f"{proc.pid}\n")
    if wait:
        try:
            wait_until_ready(config, timeout=timeout, pids={node_id: proc.pid})
        except BrokerError:
            _terminate(proc.pid, grace=10.0)
            node.pid_file.unlink(missing_ok=True)
            raise
    return proc.pid


def kill_node(config: BrokerConfig, node_id: int, sig: int = signal.SIGKILL, timeout: float = 30.0) -> int:
    """Send `sig` to one node (SIGKILL: a crash, no controlled shutdown) and wait until it is
    gone; returns its pid. For fault tests and drills."""
    node = config.node(node_id)
    pid = _read_pid(node)
    if pid is None:
        raise BrokerError(f"node {node_id} is not running ({node.data_dir})")
    os.killpg(pid, sig)
    deadline = time.monotonic() + timeout
    while _is_alive(pid):
        if time.monotonic() > deadline:
            raise BrokerError(f"node {node_id} (pid {pid}) still alive {timeout:.0f}s after signal {sig}")
        time.sleep(0.05)
    node.pid_file.unlink(missing_ok=True)
    return pid


def _terminate(pid: int, grace: float) -> None:
    # pgid == pid because of start_new_session; signalling the group also reaches any
    # helper the JVM may have forked.
    def signal_group(sig: int) -> None:
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            os.kill(pid, sig)

    signal_group(signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not _is_alive(pid):
            return
        time.sleep(0.2)
    signal_group(signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while _is_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)


def stop(config: BrokerConfig | None = None, timeout: float = 30.0) -> bool:
    """Stop every node (SIGTERM, then SIGKILL after `timeout`). True if one was running."""
    config = config or BrokerConfig.from_env()
    if config.external:
        return False
    running = [(n, pid) for n in config.nodes() if (pid := _read_pid(n)) is not None]
    # All at once: a node stopping alone in a cluster hands its partitions over first, and the
    # last ones would wait for a controller quorum that is already gone.
    for _, pid in running:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
    for node, pid in running:
        _terminate(pid, grace=timeout)
        node.pid_file.unlink(missing_ok=True)
        if _is_alive(pid):
            raise BrokerError(f"Kafka node {node.node_id} pid {pid} survived SIGKILL")
    return bool(running)


def status(config: BrokerConfig | None = None) -> BrokerStatus:
    config = config or BrokerConfig.from_env()
    if config.external:
        topics = count_topics(config.bootstrap)
        return BrokerStatus(topics is not None, None, config.bootstrap, topics, True, None)
    pids = {n.node_id: (_read_pid(n) if n.data_dir.exists() else None) for n in config.nodes()}
    alive = [pid for pid in pids.values() if pid is not None]
    topics = count_topics(config.bootstrap, settings=config.admin_settings()) if alive else None
    nodes = [{"node": n.node_id, "bootstrap": n.address, "pid": pids[n.node_id], "running": pids[n.node_id] is not None}
             for n in config.nodes()]
    # running: every node is (a cluster missing a node still serves, but is degraded: status says so)
    return BrokerStatus(len(alive) == len(pids), alive[0] if alive else None, config.bootstrap, topics, False,
                        str(config.data_dir), nodes if config.brokers > 1 else [])


# The names the CLI and the `mallwatt stack` command use.
up = start
down = stop


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m infra.broker",
        description="Run the local KRaft Kafka broker for development (data in var/kafka), or a "
        "local cluster of them (--brokers 3). With MALLWATT_KAFKA set, nothing is started or stopped.",
    )
    parser.add_argument("command", choices=("up", "down", "status"))
    parser.add_argument(
        "--data-dir", type=Path, help=f"env MALLWATT_KAFKA_DATA_DIR, default {DEFAULT_DATA_DIR}"
    )
    parser.add_argument("--port", type=int, help="PLAINTEXT port (env MALLWATT_KAFKA_PORT, 19092)")
    parser.add_argument("--controller-port", type=int, help="KRaft controller port (port + 1)")
    parser.add_argument("--brokers", type=int, help="nodes of the local cluster (env MALLWATT_KAFKA_BROKERS; "
                        "default: what the last `up` in the data dir started, else 1)")
    parser.add_argument("--no-topics", action="store_true", help="up: skip topic provisioning")
    parser.add_argument("--json", action="store_true", help="print status as JSON")
    args = parser.parse_args(argv)

    overrides: dict[str, object] = {"data_dir": args.data_dir, "port": args.port, "brokers": args.brokers}
    if args.port is not None and args.controller_port is None:
        overrides["controller_port"] = args.port + 1
    if args.controller_port is not None:
        overrides["controller_port"] = args.controller_port
    try:
        config = BrokerConfig.from_env(**overrides)
        if args.command == "up":
            t0 = time.monotonic()
            st = start(config)
            if not args.no_topics:
                from infra.topics import provision_topics

                created = provision_topics(config.bootstrap)
                if created:
                    print(f"created topics: {', '.join(created)}", file=sys.stderr)
                st = status(config)
            print(f"kafka up at {st.bootstrap} (pid {st.pid}, {time.monotonic() - t0:.1f}s)",
                  file=sys.stderr)  # fmt: skip
        elif args.command == "down":
            if config.external:
                print(f"MALLWATT_KAFKA={config.external}: external cluster, not stopped",
                      file=sys.stderr)  # fmt: skip
            else:
                print("kafka stopped" if stop(config) else "kafka was not running",
                      file=sys.stderr)  # fmt: skip
        st = status(config)
    except (BrokerError, kafka_runtime.KafkaRuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(asdict(st)))
    else:
        state = "running" if st.running else "stopped"
        where = "external" if st.external else f"pid {st.pid}, data {st.data_dir}"
        print(f"kafka {state} at {st.bootstrap} ({where}); topics: {st.topics}")
    return 0 if (st.running or args.command == "down") else 3


if __name__ == "__main__":
    sys.exit(main())
