"""Start and stop Flower's processes for a fedtreelora run: a SuperLink, SuperNodes, ``flwr run``.

Used by ``fedtreelora flower simulate`` (a local SuperLink in simulation mode, one process tree, no
open ports beyond loopback) and by the deployment tests; the deployment guide (docs/flower.md) gives
the same commands to type on each machine.

Every process starts in its own session so that :func:`stop` ends it together with the helpers it
spawned (SuperExec, ServerApp and ClientApp processes).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tomli_w

from fedtreelora.engines.flower.certs import Credentials
from fedtreelora.runfolder import RunFolder

BIN = Path(sys.executable).parent


def executable(name: str) -> str:
    """A Flower command from the running environment (falls back to PATH)."""
    path = BIN / name
    return str(path) if path.exists() else name


def flower_env(home: str | Path) -> dict[str, str]:
    """The environment Flower's processes run in: ``FLWR_HOME`` for its config and apps, this
    environment's ``bin`` first on PATH (the SuperLink starts ``flower-superexec`` by name)."""
    env = dict(os.environ)
    env["FLWR_HOME"] = str(home)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("HF_HUB_OFFLINE", os.environ.get("HF_HUB_OFFLINE", "0"))
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # no usage reports from our own processes unless asked
    # Ray hides GPUs from workers given no GPU share; leave them visible so clients can use a GPU.
    env.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 60.0, process: subprocess.Popen | None = None) -> None:
    """Block until something accepts connections on ``127.0.0.1:port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the process serving port {port} exited with code {process.returncode}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listened on 127.0.0.1:{port} within {timeout:.0f} s")


def _start(command: Sequence[str], env: Mapping[str, str], log: Path | None) -> subprocess.Popen:
    out = open(log, "ab") if log is not None else subprocess.DEVNULL  # noqa: SIM115 - kept open for the process
    return subprocess.Popen(list(command), env=dict(env), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop(process: subprocess.Popen | None, timeout: float = 10.0) -> None:
    """Stop a process and everything it started (SIGTERM, then SIGKILL after ``timeout`` s)."""
    if process is None or process.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def start_superlink(
    home: str | Path,
    port: int,
    *,
    simulation: bool = False,
    credentials: Credentials | None = None,
    authenticate: bool = False,
    log: Path | None = None,
) -> subprocess.Popen:
    """``flower-superlink`` on 127.0.0.1:``port`` (TLS when ``credentials`` are given; SuperNode
    authentication when ``authenticate``). Runtime dependency installation is off: fedtreelora is
    already installed where the apps run."""
    command = [executable("flower-superlink"), "--host", "127.0.0.1", "--port", str(port)]
    command += ["--disable-runtime-dependency-installation"]
    if credentials is None:
        command.append("--insecure")
    else:
        command += ["--ssl-ca-certfile", str(credentials.ca_cert)]
        command += ["--ssl-certfile", str(credentials.server_cert), "--ssl-keyfile", str(credentials.server_key)]
    if authenticate:
        command.append("--enable-supernode-auth")
    if simulation:
        command.append("--simulation")
    process = _start(command, flower_env(home), log)
    wait_for_port(port, process=process)
    return process


def write_connection(home: str | Path, name: str, address: str, root_certificates: Path | None = None) -> Path:
    """Add a SuperLink connection ``name`` to ``FLWR_HOME/config.toml`` (insecure without a CA)."""
    path = Path(home) / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {"superlink": {"default": name}}
    if path.exists():
        import tomli

        data = tomli.loads(path.read_text())
        data.setdefault("superlink", {})["default"] = name
    entry: dict[str, Any] = {"address": address}
    if root_certificates is None:
        entry["insecure"] = True
    else:
        entry["root-certificates"] = str(root_certificates)
    data["superlink"][name] = entry
    path.write_text(tomli_w.dumps(data))
    return path


def flwr(
    home: str | Path, *args: str, timeout: float | None = None, log: Path | None = None
) -> subprocess.CompletedProcess:
    """Run a ``flwr`` CLI command with ``FLWR_HOME=home``; output captured (and appended to ``log``)."""
    done = subprocess.run(
        [executable("flwr"), *args], env=flower_env(home), capture_output=True, text=True, timeout=timeout, check=False
    )
    if log is not None:
        with open(log, "a") as f:
            f.write(f"$ flwr {' '.join(args)}\n{done.stdout}{done.stderr}\n")
    return done


def register_supernode(home: str | Path, connection: str, public_key: Path) -> None:
    """``flwr supernode register``: let the SuperLink accept the SuperNode holding that key."""
    done = flwr(home, "supernode", "register", str(public_key), connection, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"registering {public_key} failed:\n{done.stdout}{done.stderr}")


def start_supernode(
    home: str | Path,
    superlink: str,
    *,
    node_config: Mapping[str, Any],
    port: int,
    root_certificates: Path | None = None,
    private_key: Path | None = None,
    log: Path | None = None,
) -> subprocess.Popen:
    """``flower-supernode`` connected to ``superlink`` (host:port), its own runtime API on ``port``."""
    pairs = " ".join(f'{k}="{v}"' if isinstance(v, str) else f"{k}={v}" for k, v in node_config.items())
    command = [executable("flower-supernode"), "--superlink", superlink, "--port", str(port), "--node-config", pairs]
    command += ["--insecure"] if root_certificates is None else ["--root-certificates", str(root_certificates)]
    if private_key is not None:
        command += ["--auth-supernode-private-key", str(private_key)]
    return _start(command, flower_env(home), log)


def run_app(
    home: str | Path,
    app_dir: str | Path,
    connection: str,
    *,
    num_supernodes: int | None = None,
    timeout: float | None = None,
    log: Path | None = None,
    echo: bool = False,
) -> int:
    """``flwr run APP CONNECTION --stream`` until the run ends; returns its exit code.

    ``num_supernodes`` sizes a simulation. With ``echo`` the run's log streams to stderr.
    """
    command = [executable("flwr"), "run", str(app_dir), connection, "--stream"]
    if num_supernodes is not None:
        command += ["--federation-config", f"num-supernodes={num_supernodes}"]
    log_file = None if echo or log is None else open(log, "ab")  # noqa: SIM115  (closed below)
    sink = sys.stderr if echo else (subprocess.DEVNULL if log_file is None else log_file)
    try:
        done = subprocess.run(
            command, env=flower_env(home), stdout=sink, stderr=subprocess.STDOUT, timeout=timeout, check=False
        )
    finally:
        if log_file is not None:
            log_file.close()
    return done.returncode


def simulate(
    config: Any,
    out_dir: str | Path,
    *,
    round_timeout: float | None = None,
    echo: bool = True,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Run ``config`` in Flower's simulation engine, one virtual SuperNode per client.

    Writes the app to ``OUT/flower/app``, starts a private SuperLink in simulation mode on a free
    loopback port (its state and logs in ``OUT/flower``), submits the run with ``flwr run``, and
    stops the SuperLink. The ServerApp writes the usual outputs to ``OUT``.

    Returns:
        the run summary (also in ``OUT``).
    """
    from fedtreelora.engines.flower.project import write_app
    from fedtreelora.engines.flower.settings import FlowerRunSettings

    out = Path(out_dir).resolve()
    work = out / "flower"
    work.mkdir(parents=True, exist_ok=True)
    run = RunFolder(out)
    run.summary.unlink(missing_ok=True)  # so that only this run's summary counts as its result
    settings = FlowerRunSettings.for_experiment(config, out_dir=out, round_timeout=round_timeout)
    app = write_app(settings, work / "app")
    home = work / "home"
    port = free_port()
    write_connection(home, "local-simulation", f"127.0.0.1:{port}")
    superlink = start_superlink(home, port, simulation=True, log=work / "superlink.log")
    try:
        code = run_app(
            home, app, "local-simulation", num_supernodes=config.data.num_clients, timeout=timeout,
            log=work / "run.log", echo=echo,
        )  # fmt: skip
    finally:
        stop(superlink)
    if not run.summary.exists():
        raise RuntimeError(
            f"the Flower run ended (exit code {code}) without a summary; see {work}/run.log and superlink.log"
        )
    return run.require_summary()
