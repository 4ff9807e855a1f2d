"""Start a local Orthanc PACS with DICOMweb on loopback (Debian packages ``orthanc`` + ``orthanc-dicomweb``).

Used by ``make pacs``, the tests and the benchmarks::

    python -m crossmodal.orthanc --port 8042 --storage data/orthanc   # runs until Ctrl-C
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def free_port() -> int:
    """A TCP port on 127.0.0.1 free at the time of the call."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_orthanc() -> str:
    """Path of the Orthanc binary; raises FileNotFoundError saying how to install it."""
    exe = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if os.path.exists("/usr/sbin/Orthanc") else None)
    if not exe or not os.path.exists(PLUGIN):
        raise FileNotFoundError("Orthanc with its DICOMweb plugin is not installed: run `make install-system` "
                                "(Debian packages orthanc, orthanc-dicomweb)")
    return exe


class Orthanc:
    """One Orthanc process: HTTP on ``127.0.0.1:port`` (remote access off), DICOMweb at ``/dicom-web``.

    ``storage`` persists between starts (stop and start again keeps the studies).
    """

    def __init__(self, storage: str | os.PathLike[str] | None = None, port: int | None = None) -> None:
        self.port = port or free_port()
        self.storage = Path(storage) if storage else Path(tempfile.mkdtemp(prefix="orthanc-"))
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def start(self, timeout: float = 60.0) -> Orthanc:
        exe = find_orthanc()
        self.storage.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "crossmodal", "HttpPort": self.port, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "DicomServerEnabled": False,
            "StorageDirectory": str(self.storage / "db"), "IndexDirectory": str(self.storage / "db"),
            "Plugins": [PLUGIN], "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "StudiesMetadata": "Full",
                                               "SeriesMetadata": "Full"},
            "StableAge": 1, "HttpTimeout": 60,
        }
        cfg_file = self.storage / "orthanc.json"
        cfg_file.write_text(json.dumps(config, indent=2))
        self.log = open(self.storage / "orthanc.log", "ab")
        self.proc = subprocess.Popen([exe, str(cfg_file)], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}; see {self.storage / 'orthanc.log'}")
            try:
                if requests.get(f"{self.url}/system", timeout=2).ok:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"Orthanc did not answer on {self.url} within {timeout:.0f} s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a paused (SIGSTOP) Orthanc cannot handle SIGTERM
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if getattr(self, "log", None):
            self.log.close()

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """`python -m crossmodal.orthanc`: a local Orthanc with DICOMweb until interrupted."""
    p = argparse.ArgumentParser(description="run a local Orthanc with DICOMweb until interrupted")
    p.add_argument("--port", type=int, default=8042)
    p.add_argument("--storage", default="data/orthanc")
    p.add_argument("--wait", action="store_true", help="only wait (60 s) until an Orthanc answers on --port")
    args = p.parse_args(argv)
    if args.wait:
        for _ in range(120):
            try:
                if requests.get(f"http://127.0.0.1:{args.port}/system", timeout=2).ok:
                    return 0
            except requests.RequestException:
                pass
            time.sleep(0.5)
        print(f"no Orthanc answered on 127.0.0.1:{args.port} within 60 s", file=sys.stderr)
        return 1
    server = Orthanc(args.storage, args.port).start()
    print(f"Orthanc on {server.url}, DICOMweb at {server.dicomweb}, storage {server.storage}", flush=True)

    def stop(*_: object) -> None:
        server.stop()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    try:
        assert server.proc is not None
        server.proc.wait()
    except KeyboardInterrupt:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
