"""Helpers for tests that start real processes: Flower's SuperLink and SuperNodes, a Ray cluster.

Every process a :class:`Processes` starts gets a marker in its environment, which the
processes they start in turn (SuperExec, ServerApp, ClientApp, Ray workers) inherit even
when they detach into sessions of their own. :meth:`Processes.stop` stops the ones it
started, then any process that still carries the marker, and returns what it could not
stop, so a test can assert that nothing is left.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MARKER = "FEDMASK_TEST_PROCESS_TAG"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode} before listening on {port}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


def _tagged(tag: str) -> list[int]:
    """Process ids whose environment carries ``MARKER=tag`` (zombies excluded)."""
    needle = f"{MARKER}={tag}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


class Processes:
    """Processes started for one test; logs go to ``log_dir/<name>.log``."""

    def __init__(self, log_dir: Path, env: dict[str, str] | None = None):
        self.log_dir, self.tag = Path(log_dir), uuid.uuid4().hex
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, **(env or {}), MARKER: self.tag, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
                    "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
                    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_DISABLE_UPDATE_CHECK": "1",
                    "RAY_USAGE_STATS_ENABLED": "0"}
        self.started: list[subprocess.Popen] = []

    def start(self, name: str, args: list[str], cwd: Path | None = None) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "wb")
        proc = subprocess.Popen(args, cwd=cwd or ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        self.started.append(proc)
        return proc

    def run(self, name: str, args: list[str], timeout: float, cwd: Path | None = None,
            check: bool = True) -> subprocess.CompletedProcess:
        """Run a command to its end (its output in the log and in the result)."""
        proc = self.start(name, args, cwd)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._signal_group(proc, signal.SIGKILL)
            proc.wait()
            raise TimeoutError(f"{name}: {args!r} still running after {timeout:.0f} s; see {self.log(name)}") from None
        output = self.log(name)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{name}: {args!r} exited with {proc.returncode}:\n{output[-3000:]}")
        return subprocess.CompletedProcess(args, proc.returncode, output, "")

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    @staticmethod
    def _signal_group(proc: subprocess.Popen, sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass

    def alive(self) -> list[int]:
        return _tagged(self.tag)

    def stop(self, grace: float = 5.0) -> list[int]:
        """SIGTERM what was started (process groups), then anything still tagged; SIGKILL after
        ``grace`` seconds. Returns the ids of processes still alive after that (should be none)."""
        for proc in self.started:
            if proc.poll() is None:
                self._signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and (any(p.poll() is None for p in self.started) or self.alive()):
            time.sleep(0.1)
        for pid in self.alive():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for proc in self.started:
            if proc.poll() is None:
                self._signal_group(proc, signal.SIGKILL)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and self.alive():
            time.sleep(0.1)
        return self.alive()


def write_flower_config(home: Path, name: str, connection: dict[str, object]) -> None:
    """A Flower 1.41 config (``$FLWR_HOME/config.toml``) with one SuperLink connection, the default."""
    home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{name}"', "", f"[superlink.{name}]"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in connection.items()]
    (home / "config.toml").write_text("\n".join(lines) + "\n")


def make_certificates(directory: Path) -> dict[str, Path]:
    """A CA and a server certificate for 127.0.0.1 / localhost signed by it (PEM files)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = (x509.CertificateBuilder().subject_name(name("fedmask test CA")).issuer_name(name("fedmask test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (x509.CertificateBuilder().subject_name(name("127.0.0.1")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = {"ca": directory / "ca.crt", "cert": directory / "server.pem", "key": directory / "server.key"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    return paths


def make_node_key(directory: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's EC (P-384) key pair in OpenSSH format, as ``ssh-keygen -t ecdsa -b 384`` writes it."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    private, public = directory / name, directory / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()))
    private.chmod(0o600)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH))
    return private, public
