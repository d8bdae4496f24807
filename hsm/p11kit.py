"""p11-kit's PKCS#11 remoting as a stand-in network HSM (tests and bench only, #22 item 4).

`p11-kit server --provider <SoftHSM2> pkcs11:token=LABEL` exports one token over a unix socket; the client
module ``p11-kit-client.so`` (V2GPKI_PKCS11_MODULE) reaches it at ``$P11_KIT_SERVER_ADDRESS``. Every
PKCS#11 call becomes a round trip over the socket, and the remote token offers fewer mechanisms than
SoftHSM2 itself (36 of 70 with p11-kit 0.24: no Ed448, no AES-GCM), as a real network HSM may.

The server forks a child per client connection: stopping it means the whole process group.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from hsm.pkcs11 import DEFAULT_MODULE

CLIENT_NAME = "p11-kit-client.so"


def client_module(configured: str | None = None) -> str | None:
    """The p11-kit client module, found at run time (its directory is the multiarch library directory,
    which differs between machines): ``configured`` (the caller's Settings.p11kit_client,
    V2GPKI_P11KIT_CLIENT — hsm/ sits below pki/ and reads no settings itself), else
    ``pkcs11/p11-kit-client.so`` beside the libp11-kit.so.0 the dynamic linker knows (ldconfig -p)."""
    if configured:
        return configured if Path(configured).is_file() else None
    ldconfig = shutil.which("ldconfig") or ("/usr/sbin/ldconfig" if Path("/usr/sbin/ldconfig").exists() else None)
    if ldconfig is None:
        return None
    out = subprocess.run([ldconfig, "-p"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        if line.strip().startswith("libp11-kit.so") and "=>" in line:
            cand = Path(line.split("=>", 1)[1].strip()).resolve().parent / "pkcs11" / CLIENT_NAME
            if cand.is_file():
                return str(cand)
    return None


def available(configured: str | None = None) -> str | None:
    """Why p11-kit remoting cannot run here, or None when it can."""
    if shutil.which("p11-kit") is None:
        return "p11-kit not installed (apt-get install p11-kit p11-kit-modules; scripts/setup.sh does)"
    if client_module(configured) is None:
        return f"{CLIENT_NAME} not found (apt-get install p11-kit-modules)"
    return None


class P11KitServer:
    """`p11-kit server` exporting token ``label`` of the SoftHSM2 configuration ``softhsm_conf`` on the unix
    socket ``socket``; ``kill()`` and ``start()`` again on the same path (an HSM going away and coming back)."""

    def __init__(self, socket: Path, label: str, softhsm_conf: Path, provider: str = DEFAULT_MODULE) -> None:
        if len(str(socket)) > 100:
            raise ValueError(f"unix socket path too long: {socket}")
        self.socket = socket
        self.label = label
        self.softhsm_conf = softhsm_conf
        self.provider = provider
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        """The value of P11_KIT_SERVER_ADDRESS for clients."""
        return f"unix:path={self.socket}"

    def start(self, timeout: float = 15.0) -> None:
        self.socket.unlink(missing_ok=True)
        # env: the p11-kit server child's environment, pointing SoftHSM2 (its provider) at our token
        env = dict(os.environ, SOFTHSM2_CONF=str(self.softhsm_conf))
        self.proc = subprocess.Popen(
            ["p11-kit", "server", "-f", "-n", str(self.socket), "--provider", self.provider,
             f"pkcs11:token={self.label}"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self.socket.exists():
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"p11-kit server exited ({self.proc.returncode}): {err[-500:]}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError("p11-kit server did not create its socket")
            time.sleep(0.01)

    def kill(self) -> None:
        """SIGKILL the server and every per-connection child (its process group): the HSM is gone."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        if self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None

    def __enter__(self) -> P11KitServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
        self.socket.unlink(missing_ok=True)
