"""One SSH connection to a host (paramiko): host-key checks as ssh does them,
commands with a deadline, files over SFTP.

Every failure is a HostError whose message says what went wrong on that host
and what to do about it; nothing here waits without a timeout.
"""
import base64
import contextlib
import errno
import getpass
import hashlib
import logging
import os
import select
import socket
import stat
import threading
import time

import paramiko

DEFAULT_KNOWN_HOSTS = os.path.expanduser("~/.ssh/known_hosts")
# paramiko's threads log what we report per host anyway (with a traceback).
logging.getLogger("paramiko").addHandler(logging.NullHandler())
logging.getLogger("paramiko").propagate = False
_known_hosts_lock = threading.Lock()      # threads of one run accept keys into one file


class HostError(Exception):
    """A step failed on one host; the message is the report's error column."""


class SshOptions:
    """How to reach the hosts (the options every minray-cluster command takes)."""

    def __init__(self, user=None, key=None, port=22, known_hosts=None, accept_new=False,
                 timeout=30.0):
        self.user = user
        self.key = key
        self.port = port
        self.known_hosts = known_hosts          # a file besides ~/.ssh/known_hosts
        self.accept_new = accept_new
        self.timeout = timeout


def fingerprint(key):
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


class _AcceptNewOrRefuse(paramiko.MissingHostKeyPolicy):
    """An unknown host key: refused with how to accept it, or (accept_new,
    ssh's StrictHostKeyChecking=accept-new) recorded in the known-hosts file.
    A known host whose key changed never gets here: paramiko refuses it."""

    def __init__(self, options):
        self.options = options

    def missing_host_key(self, client, hostname, key):
        if not self.options.accept_new:
            raise HostError(
                f"unknown host key for {hostname} ({key.get_name()} {fingerprint(key)}): "
                f"check the fingerprint, then run again with --accept-new-host-keys to record "
                f"it in {self.options.known_hosts or DEFAULT_KNOWN_HOSTS}")
        path = self.options.known_hosts or DEFAULT_KNOWN_HOSTS
        with _known_hosts_lock:
            directory = os.path.dirname(path)
            if directory:
                os.makedirs(directory, mode=0o700, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            with os.fdopen(fd, "a") as f:
                f.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")
        client.get_host_keys().add(hostname, key.get_name(), key)


class Connection:
    """An open SSH connection to one Host of workers.txt."""

    def __init__(self, host, options):
        self.host = host
        self.options = options
        self.user = host.user or options.user or getpass.getuser()
        self.port = host.port or options.port or 22
        self.client = paramiko.SSHClient()
        self._sftp = None

    def open(self):
        client, options = self.client, self.options
        where = f"{self.user}@{self.host.host}:{self.port}"
        try:
            client.load_system_host_keys()
            if options.known_hosts and os.path.exists(options.known_hosts):
                client.load_host_keys(options.known_hosts)
        except (OSError, paramiko.SSHException, paramiko.hostkeys.InvalidHostKey) as exc:
            raise HostError(f"can't read the known-hosts file: {exc}") from None
        client.set_missing_host_key_policy(_AcceptNewOrRefuse(options))
        try:
            client.connect(
                self.host.host, port=self.port, username=self.user,
                key_filename=options.key, allow_agent=options.key is None,
                look_for_keys=options.key is None, timeout=options.timeout,
                banner_timeout=options.timeout, auth_timeout=options.timeout,
                channel_timeout=options.timeout)
        except HostError:
            raise
        except paramiko.BadHostKeyException as exc:
            files = " and ".join(f for f in (DEFAULT_KNOWN_HOSTS, options.known_hosts) if f)
            name = self.host.host if self.port == 22 else f"[{self.host.host}]:{self.port}"
            raise HostError(
                f"the host key of {where} CHANGED (now {fingerprint(exc.key)}): refused, as "
                "ssh does. If the host was reinstalled, remove its old key with "
                f"`ssh-keygen -R '{name}' -f FILE` ({files}) and accept the new one") from None
        except paramiko.AuthenticationException as exc:
            how = f"the key {options.key}" if options.key else "the SSH agent and ~/.ssh keys"
            raise HostError(f"authentication as {self.user} failed with {how} ({exc}): "
                            "check --ssh-user and --ssh-key") from None
        except socket.gaierror as exc:
            raise HostError(f"unknown host name {self.host.host!r} ({exc.strerror})") from None
        except (ConnectionRefusedError, paramiko.ssh_exception.NoValidConnectionsError) as exc:
            errors = getattr(exc, "errors", {}).values()
            if isinstance(exc, ConnectionRefusedError) or any(
                    getattr(e, "errno", None) == errno.ECONNREFUSED for e in errors):
                raise HostError(f"connection refused by {self.host.host}:{self.port}: is sshd "
                                "running there, on that port (--ssh-port or host:port)?") from None
            raise HostError(f"unreachable: {self.host.host}:{self.port} "
                            f"({'; '.join(str(e) for e in errors) or exc})") from None
        except (socket.timeout, TimeoutError):
            raise HostError(f"unreachable: {self.host.host}:{self.port} did not answer within "
                            f"{options.timeout:g} s") from None
        except (OSError, EOFError, paramiko.SSHException) as exc:
            transport = client.get_transport()
            if "banner" in str(exc) or (transport is not None and not transport.remote_version):
                raise HostError(f"unreachable: {self.host.host}:{self.port} took the connection "
                                f"but no SSH server answered within {options.timeout:g} s "
                                "(wrong port, or the host is hung)") from None
            raise HostError(f"SSH to {where} failed: {exc or type(exc).__name__}") from None
        return self

    def local_address(self):
        """Our address as the host sees it (where it can reach this machine)."""
        return self.client.get_transport().sock.getsockname()[0]

    def run(self, command, timeout, stdin_data=None):
        """Run a shell command; (exit code, stdout, stderr) as text. HostError
        if it does not end within timeout seconds (it is then closed)."""
        try:
            channel = self.client.get_transport().open_session(timeout=self.options.timeout)
            channel.exec_command(command)
            if stdin_data is not None:
                channel.sendall(stdin_data)
            channel.shutdown_write()
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise HostError(f"the SSH connection failed: {exc or type(exc).__name__}") from None
        out, err = bytearray(), bytearray()
        deadline = time.monotonic() + timeout
        try:
            while True:
                while channel.recv_ready():
                    out += channel.recv(65536)
                while channel.recv_stderr_ready():
                    err += channel.recv_stderr(65536)
                # Done when it exited and sent all it wrote (EOF after the
                # exit status can still bring data).
                if channel.exit_status_ready() and channel.eof_received \
                        and not channel.recv_ready() and not channel.recv_stderr_ready():
                    break
                if time.monotonic() > deadline:
                    raise HostError(f"`{_short(command)}` did not finish within {timeout:g} s")
                select.select([channel], [], [], 0.05)
            code = channel.recv_exit_status()
        finally:
            channel.close()
        return code, out.decode(errors="replace"), err.decode(errors="replace")

    # ------------------------------------------------------------ files
    @property
    def sftp(self):
        if self._sftp is None:
            with _sftp_errors("opening SFTP"):
                self._sftp = self.client.open_sftp()
                self._sftp.get_channel().settimeout(self.options.timeout)
        return self._sftp

    def home(self):
        with _sftp_errors("finding the home directory"):
            return self.sftp.normalize(".")

    def make_dirs(self, path, mode=0o755):
        """mkdir -p over SFTP."""
        parts = [p for p in path.split("/") if p]
        current = "" if path.startswith("/") else "."
        with _sftp_errors(f"making {path}"):
            for part in parts:
                current = f"{current}/{part}"
                try:
                    if not stat.S_ISDIR(self.sftp.stat(current).st_mode):
                        raise HostError(f"{current} exists on the host and is not a directory")
                except FileNotFoundError:
                    self.sftp.mkdir(current, mode)

    def chmod(self, path, mode):
        with _sftp_errors(f"chmod of {path}"):
            self.sftp.chmod(path, mode)

    def write_private(self, path, data):
        """Write a new file only its owner can read (0600 before any byte is in it)."""
        with _sftp_errors(f"writing {path}"):
            with self.sftp.open(path, "wx") as f:
                f.chmod(0o600)
                f.write(data)

    def remove(self, path, directory=False):
        """Delete a file (or an empty directory) if it is there (best effort:
        the step's own error matters more)."""
        try:
            (self.sftp.rmdir if directory else self.sftp.remove)(path)
        except (OSError, EOFError, paramiko.SSHException, HostError):
            pass

    def put(self, local_path, remote_path, progress=None):
        with _sftp_errors(f"copying {local_path} to {remote_path}"):
            self.sftp.put(local_path, remote_path, callback=progress)

    def close(self):
        try:
            if self._sftp is not None:
                self._sftp.close()
            self.client.close()
        except (OSError, EOFError, paramiko.SSHException):
            pass                    # (closing a broken connection)


@contextlib.contextmanager
def _sftp_errors(what):
    try:
        yield
    except HostError:
        raise
    except (OSError, EOFError, paramiko.SSHException) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else \
            (str(exc) or type(exc).__name__)
        raise HostError(f"{what} over SFTP failed: {why}") from None


def _short(command, limit=60):
    return command if len(command) <= limit else command[:limit - 3] + "..."
