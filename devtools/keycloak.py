"""Start a real Keycloak (``kc.sh start-dev --import-realm``) for integration tests.

Usage from ``tests/conftest.py``::

    from devtools.keycloak import start_keycloak

    @pytest.fixture(scope="session")
    def keycloak(tmp_path_factory):
        with start_keycloak(tmp_path_factory.mktemp("keycloak")) as kc:
            yield kc          # kc.url, kc.issuer, kc.admin_token(), kc.token("sam", "demo")

What it does:

* finds ``keycloak-quarkus-dist-<version>.tar.gz`` in the cache dir (``GATEWAY_KEYCLOAK_CACHE``,
  default ``~/.cache/gw-keycloak``), downloading it once with ``mvn dependency:copy`` if missing,
  and unpacks it there once;
* builds a per-run home under ``tmp_dir`` (own ``bin``/``conf``/``data``, with ``lib``,
  ``providers`` and ``themes`` symlinked to the cache) so every run has a fresh database, with
  ``fixtures/realm-cx-dev.json`` in ``data/import``;
* starts ``kc.sh start-dev --import-realm`` on a free loopback port with a bootstrap admin, a
  512 MiB heap and a JDK it finds (``GATEWAY_KEYCLOAK_JAVA_HOME``, else 21, 17, 25, ``JAVA_HOME``),
  waits for the realm's well-known document (default 180 s) and stops it afterwards.

A missing tool is an error naming the package to install, never a skip.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROJECT_DIR = Path(__file__).resolve().parent.parent
REALM_FILE = PROJECT_DIR / "fixtures" / "realm-cx-dev.json"
KEYCLOAK_VERSION = os.environ.get("GATEWAY_KEYCLOAK_VERSION", "26.4.7")
ARTIFACT = "org.keycloak:keycloak-quarkus-dist:{version}:tar.gz"
ADMIN_USER = "admin"
ADMIN_PASSWORD = "admin-dev-only"

#: JDKs Keycloak 26 is known to start with here, best first (21 is Keycloak's reference JDK;
#: 26.4.7 measured on 17 and 25 too).
_JDK_PREFERENCE = (21, 17, 25)


class KeycloakHarnessError(RuntimeError):
    """Keycloak could not be provided; the message says what to install or look at."""


def cache_dir() -> Path:
    return Path(os.environ.get("GATEWAY_KEYCLOAK_CACHE") or Path.home() / ".cache" / "gw-keycloak")


# --- distribution ---------------------------------------------------------------------------------
def ensure_distribution(version: str = KEYCLOAK_VERSION, cache: Path | None = None) -> Path:
    """The unpacked ``keycloak-<version>`` directory in the cache, downloading/unpacking once."""
    cache = cache or cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    home = cache / f"keycloak-{version}"
    if (home / "bin" / "kc.sh").exists() and (home / "lib" / "quarkus-run.jar").exists():
        return home
    archive = cache / f"keycloak-quarkus-dist-{version}.tar.gz"
    if not archive.exists():
        _download(version, cache)
    if not archive.exists():
        raise KeycloakHarnessError(f"mvn finished but {archive} is not there")
    staging = cache / f".unpack-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        if shutil.which("tar"):
            subprocess.run(["tar", "xzf", str(archive), "-C", str(staging)], check=True)
        else:  # pragma: no cover - tar is everywhere
            with tarfile.open(archive) as tf:
                tf.extractall(staging, filter="data")
        unpacked = staging / f"keycloak-{version}"
        if not (unpacked / "bin" / "kc.sh").exists():
            raise KeycloakHarnessError(f"{archive} does not contain keycloak-{version}/bin/kc.sh")
        try:
            unpacked.rename(home)
        except OSError:
            if not (home / "bin" / "kc.sh").exists():  # not a concurrent unpack that won
                raise
    except subprocess.CalledProcessError as exc:
        raise KeycloakHarnessError(f"unpacking {archive} failed ({exc}); delete it to download again") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return home


def _download(version: str, cache: Path) -> None:
    mvn = shutil.which("mvn")
    if mvn is None:
        raise KeycloakHarnessError(
            "Keycloak is not in the cache and Maven is missing to fetch it: install it "
            "(`apt-get install maven`) or put keycloak-quarkus-dist-"
            f"{version}.tar.gz into {cache} (GATEWAY_KEYCLOAK_CACHE)"
        )
    cmd = [
        mvn,
        "-B",
        "-q",
        "-Dstyle.color=never",
        "dependency:copy",
        f"-Dartifact={ARTIFACT.format(version=version)}",
        f"-DoutputDirectory={cache}",
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired as exc:
        raise KeycloakHarnessError(f"`{' '.join(cmd)}` took more than 30 minutes") from exc
    if proc.returncode != 0:
        output = proc.stdout + proc.stderr
        errors = [line for line in output.splitlines() if line.startswith("[ERROR] ") and len(line) > 10]
        detail = "\n".join(errors[:3]) or output[-3000:]
        raise KeycloakHarnessError(
            f"downloading Keycloak with Maven failed (exit {proc.returncode}); check network access "
            f"to Maven Central or put the archive into {cache}:\n{' '.join(cmd)}\n{detail}"
        )


# --- Java -------------------------------------------------------------------------------------------
def java_major(java_home: str | Path) -> int | None:
    java = Path(java_home) / "bin" / "java"
    if not java.exists():
        return None
    try:
        out = subprocess.run([str(java), "-version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if not match:
        return None
    major = int(match.group(1))
    return int(match.group(2) or 0) if major == 1 else major


def find_java_home() -> tuple[str, int]:
    """A JDK able to run Keycloak 26 (17 or newer), as ``(JAVA_HOME, major version)``."""
    explicit = os.environ.get("GATEWAY_KEYCLOAK_JAVA_HOME")
    if explicit:
        major = java_major(explicit)
        if major is None or major < 17:
            raise KeycloakHarnessError(f"GATEWAY_KEYCLOAK_JAVA_HOME={explicit} is not a JDK 17+")
        return explicit, major
    candidates: list[str] = []
    jvm = Path("/usr/lib/jvm")
    if jvm.is_dir():
        candidates += [str(p) for p in sorted(jvm.iterdir()) if (p / "bin" / "java").exists()]
    if os.environ.get("JAVA_HOME"):
        candidates.append(os.environ["JAVA_HOME"])
    java_on_path = shutil.which("java")
    if java_on_path:
        candidates.append(str(Path(os.path.realpath(java_on_path)).parent.parent))
    found: dict[int, str] = {}
    for home in candidates:
        major = java_major(home)
        if major is not None and major >= 17:
            found.setdefault(major, home)
    for major in _JDK_PREFERENCE:
        if major in found:
            return found[major], major
    if found:
        major = max(found)
        return found[major], major
    raise KeycloakHarnessError(
        "no Java 17+ found for Keycloak: install one (`apt-get install openjdk-17-jre-headless`, "
        "or a Temurin 21 JDK) or set GATEWAY_KEYCLOAK_JAVA_HOME"
    )


# --- server -----------------------------------------------------------------------------------------
def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _http(
    method: str,
    url: str,
    data: dict[str, str] | None = None,
    token: str | None = None,
    body: Any = None,
    timeout: float = 30.0,
) -> tuple[int, Any]:
    headers = {}
    payload = None
    if data is not None:
        payload = urllib.parse.urlencode(data).encode()
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    elif body is not None:
        payload = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=payload, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            status = resp.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read(), exc.code
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw.decode(errors="replace")


@dataclass
class KeycloakServer:
    """A running Keycloak with the ``cx`` realm imported."""

    url: str
    realm: str
    home: Path
    log_path: Path
    java_home: str
    java_version: int
    process: subprocess.Popen[bytes] | None = None
    start_seconds: float = 0.0
    admin_username: str = ADMIN_USER
    admin_password: str = ADMIN_PASSWORD
    _log_file: Any = field(default=None, repr=False)

    @property
    def issuer(self) -> str:
        return f"{self.url}/realms/{self.realm}"

    @property
    def token_url(self) -> str:
        return f"{self.issuer}/protocol/openid-connect/token"

    def token(self, username: str, password: str, client_id: str = "gateway-console", **extra: str) -> dict[str, Any]:
        """Password grant (raises on refusal); returns the token endpoint's JSON."""
        status, body = _http(
            "POST",
            self.token_url,
            {
                "grant_type": "password",
                "client_id": client_id,
                "username": username,
                "password": password,
                **extra,
            },
        )
        if status != 200:
            raise KeycloakHarnessError(f"password grant for {username} refused: {status} {body}")
        return body

    def client_token(self, client_id: str = "cx-platform", secret: str = "dev-secret") -> dict[str, Any]:
        status, body = _http(
            "POST",
            self.token_url,
            {
                "grant_type": "client_credentials",
                "client_id": client_id,
                "client_secret": secret,
            },
        )
        if status != 200:
            raise KeycloakHarnessError(f"client_credentials for {client_id} refused: {status} {body}")
        return body

    def admin_token(self) -> str:
        """An access token of the bootstrap admin (master realm, ``admin-cli``): full rights."""
        status, body = _http(
            "POST",
            f"{self.url}/realms/master/protocol/openid-connect/token",
            {
                "grant_type": "password",
                "client_id": "admin-cli",
                "username": self.admin_username,
                "password": self.admin_password,
            },
        )
        if status != 200:
            raise KeycloakHarnessError(f"bootstrap admin login refused: {status} {body}")
        return str(body["access_token"])

    def admin(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """Call ``/admin/realms/<realm><path>`` as the bootstrap admin."""
        return _http(method, f"{self.url}/admin/realms/{self.realm}{path}", token=self.admin_token(), body=body)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the server's process group (ours alone), SIGKILL after ``timeout``."""
        proc = self.process
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(10)
        self.process = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the test process dies, even by SIGKILL, so no
    orphaned JVM keeps a core busy on a shared box (Linux; kept across exec of nice/kc.sh/java)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _make_home(dist: Path, run_dir: Path, realm_file: Path) -> Path:
    """A per-run Keycloak home: fresh ``data``, own ``conf``/``bin``, shared read-mostly jars."""
    home = run_dir / "keycloak-home"
    if home.exists():
        shutil.rmtree(home)
    home.mkdir(parents=True)
    shutil.copytree(dist / "bin", home / "bin", symlinks=True)
    shutil.copytree(dist / "conf", home / "conf", symlinks=True)
    for name in ("lib", "providers", "themes"):
        if (dist / name).exists():
            (home / name).symlink_to(dist / name, target_is_directory=True)
    (home / "data" / "import").mkdir(parents=True)
    shutil.copyfile(realm_file, home / "data" / "import" / realm_file.name)
    return home


@contextmanager
def start_keycloak(
    tmp_dir: str | Path,
    *,
    realm_file: str | Path = REALM_FILE,
    realm: str = "cx",
    version: str = KEYCLOAK_VERSION,
    timeout: float = 180.0,
    heap: str = "-Xms64m -Xmx512m",
    port: int = 0,
) -> Iterator[KeycloakServer]:
    """Run Keycloak for the ``with`` block; see the module docstring."""
    realm_path = Path(realm_file)
    if not realm_path.exists():
        raise KeycloakHarnessError(f"realm file {realm_path} is missing")
    dist = ensure_distribution(version)
    java_home, java_version = find_java_home()
    home = _make_home(dist, Path(tmp_dir), realm_path)
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = Path(tmp_dir) / "keycloak.log"
    # Fewer JIT/GC threads and C1 only: the box has two cores shared with other work, and a
    # test Keycloak lives for minutes. Override with GATEWAY_KEYCLOAK_JAVA_OPTS.
    java_opts = os.environ.get(
        "GATEWAY_KEYCLOAK_JAVA_OPTS",
        "-XX:CICompilerCount=2 -XX:ParallelGCThreads=1 -XX:ConcGCThreads=1 -XX:TieredStopAtLevel=1",
    )
    if java_version >= 24:
        # Quarkus' thread-local reset needs this on 24+, else executor threads die with
        # IllegalAccessError ("module java.base does not open java.lang").
        java_opts += " --add-opens=java.base/java.lang=ALL-UNNAMED"
    env = {
        **os.environ,
        "JAVA_HOME": java_home,
        "KC_BOOTSTRAP_ADMIN_USERNAME": ADMIN_USER,
        "KC_BOOTSTRAP_ADMIN_PASSWORD": ADMIN_PASSWORD,
        "JAVA_OPTS_KC_HEAP": heap,
        "JAVA_OPTS_APPEND": java_opts,
    }
    env.pop("JAVA_OPTS", None)
    env.pop("KC_DB", None)
    cmd = [
        str(home / "bin" / "kc.sh"),
        "start-dev",
        "--import-realm",
        "--http-host",
        "127.0.0.1",
        "--http-port",
        str(port),
        "--hostname-strict",
        "false",
        "--health-enabled",
        "false",
        "--metrics-enabled",
        "false",
        "--cache",
        "local",
    ]
    log_file = open(log_path, "wb")
    server = KeycloakServer(
        url=url,
        realm=realm,
        home=home,
        log_path=log_path,
        java_home=java_home,
        java_version=java_version,
        _log_file=log_file,
    )
    started = time.monotonic()
    nice = ["nice", "-n", "5"] if shutil.which("nice") else []
    server.process = subprocess.Popen(
        nice + cmd,
        cwd=home,
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=_die_with_parent,
    )
    try:
        well_known = f"{server.issuer}/.well-known/openid-configuration"
        while True:
            if server.process.poll() is not None:
                raise KeycloakHarnessError(
                    f"Keycloak exited with {server.process.returncode} before it was ready "
                    f"(Java {java_version} at {java_home}); log {log_path}:\n{server.log_tail()}"
                )
            try:
                status, body = _http("GET", well_known, timeout=5)
                if status == 200 and isinstance(body, dict) and body.get("issuer") == server.issuer:
                    break
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() - started > timeout:
                raise KeycloakHarnessError(
                    f"Keycloak not ready after {timeout:.0f}s; log {log_path}:\n{server.log_tail()}"
                )
            time.sleep(1.0)
        server.start_seconds = time.monotonic() - started
        yield server
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - manual use
    """``python -m devtools.keycloak [--serve] [--port N]``: start, print, (serve,) stop."""
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description="Start Keycloak with fixtures/realm-cx-dev.json")
    parser.add_argument("--serve", action="store_true", help="keep running until Ctrl-C")
    parser.add_argument("--port", type=int, default=0, help="HTTP port (default: a free one)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="gw-keycloak-") as d, start_keycloak(d, port=args.port) as kc:
        print(
            f"Keycloak {KEYCLOAK_VERSION} ready at {kc.url} in {kc.start_seconds:.1f}s "
            f"(Java {kc.java_version}, {kc.java_home}); admin {kc.admin_username}/{kc.admin_password}",
            flush=True,
        )
        if args.serve:
            print(f"gateway: GATEWAY_DEV=true GATEWAY_KEYCLOAK_URL={kc.url}  (Ctrl-C stops Keycloak)", flush=True)
            try:
                while kc.process is not None and kc.process.poll() is None:
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
        else:
            claims = kc.token("sam", "demo")["access_token"].split(".")[1]
            import base64

            print(json.dumps(json.loads(base64.urlsafe_b64decode(claims + "==")), indent=1))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
