"""Real sshd servers on loopback addresses (127.0.0.2, 127.0.0.3, ...), each
standing in for a machine of a cluster: its own host key, its own minray
session root (so `minray stop` there stops only its nodes), reached with a
user key the tests generate. Nothing listens beyond loopback."""
import getpass
import os
import shutil
import socket
import subprocess
import sys
import time

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
PRIVSEP_DIR = "/run/sshd"           # sshd refuses to start without it


def keygen(path, comment="minray-test"):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f",
                    str(path)], check=True)
    with open(f"{path}.pub") as f:
        return f.read().strip()


def free_port(ip):
    with socket.socket() as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


class FakeHost:
    """One sshd on `ip`; stop() ends it (and the minray nodes started there)."""

    def __init__(self, directory, ip, authorized_key, python_path=None):
        self.directory = directory
        self.ip = ip
        self.port = free_port(ip)
        self.session_root = os.path.join(directory, "sessions")
        os.makedirs(directory, exist_ok=True)
        self.host_key_line = keygen(os.path.join(directory, "host_key"), f"host-{ip}")
        authorized = os.path.join(directory, "authorized_keys")
        with open(authorized, "w") as f:
            f.write(authorized_key + "\n")
        env = f"MINRAY_SESSION_ROOT={self.session_root}"
        if python_path:
            env += f" PYTHONPATH={python_path}"
        config = os.path.join(directory, "sshd_config")
        with open(config, "w") as f:
            f.write(f"""ListenAddress {ip}
Port {self.port}
HostKey {directory}/host_key
AuthorizedKeysFile {authorized}
PidFile {directory}/sshd.pid
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin prohibit-password
StrictModes no
UsePAM no
SetEnv {env}
Subsystem sftp internal-sftp
LogLevel ERROR
""")
        os.makedirs(PRIVSEP_DIR, mode=0o755, exist_ok=True)
        self.log = open(os.path.join(directory, "sshd.log"), "wb")
        self.process = subprocess.Popen([SSHD, "-D", "-e", "-f", config], stdout=self.log,
                                        stderr=subprocess.STDOUT)
        self._wait_listening()

    def _wait_listening(self, timeout=20.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"sshd on {self.ip} exited: {self.read_log()}")
            try:
                socket.create_connection((self.ip, self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"sshd on {self.ip}:{self.port} did not listen within {timeout} s")

    def read_log(self):
        with open(self.log.name, errors="replace") as f:
            return f.read()

    @property
    def known_hosts_line(self):
        kind, key = self.host_key_line.split()[:2]
        return f"[{self.ip}]:{self.port} {kind} {key}"

    @property
    def spec(self):
        """Its workers.txt line."""
        return f"{getpass.getuser()}@{self.ip}:{self.port}"

    def stop_minray(self):
        """Stop what minray started under this host's session root."""
        env = dict(os.environ, MINRAY_SESSION_ROOT=self.session_root)
        subprocess.run([sys.executable, "-m", "minray.scripts.cli", "stop", "--force"], env=env,
                       capture_output=True, timeout=60)

    def stop(self):
        self.process.kill()
        self.process.wait()
        self.log.close()
