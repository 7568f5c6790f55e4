"""A cluster session: its directory, id and secret token.

The head node makes the session directory (logs, LMDB files, sockets) and a
random token in a 0600 file inside it. Every connection proves it holds the
token (minray.wire), so only processes that can read that file, or were
handed the token, can talk to the cluster.
"""
import os
import secrets
import time

# Not "/tmp/minray": run from /tmp, that directory would shadow the package.
SESSION_ROOT = os.environ.get("MINRAY_SESSION_ROOT", "/tmp/minray-sessions")
TOKEN_FILE = "token"
LOGS_DIR = "logs"
# Sessions whose logs are kept, the new one included; older finished ones
# are removed when a new session starts.
KEEP_FINISHED_SESSIONS = 10


def new_session_id():
    return time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}-{secrets.token_hex(3)}"


def create_session_dir(session_id=None, root=None):
    """Create a fresh session directory with its token; return its path."""
    root = root or SESSION_ROOT
    os.makedirs(root, mode=0o700, exist_ok=True)
    prune_finished_sessions(root, keep=KEEP_FINISHED_SESSIONS - 1)
    path = os.path.join(root, f"session-{session_id or new_session_id()}")
    os.makedirs(path, mode=0o700)
    write_token(path, secrets.token_bytes(32))
    return path


def retire_session_dir(session_dir):
    """A session has ended: remove everything but its logs, which stay for
    the user to read (the token goes too, which marks the session finished)."""
    import shutil
    try:
        names = os.listdir(session_dir)
    except FileNotFoundError:
        return
    for name in names:
        if name == LOGS_DIR:
            continue
        path = os.path.join(session_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.unlink(path)
            except OSError:
                pass


def prune_finished_sessions(root, keep=KEEP_FINISHED_SESSIONS):
    """Remove finished sessions (no token left) beyond the newest `keep`."""
    import shutil
    try:
        names = sorted(n for n in os.listdir(root) if n.startswith("session-"))
    except FileNotFoundError:
        return
    finished = [n for n in names if os.path.isdir(os.path.join(root, n))
                and not os.path.exists(os.path.join(root, n, TOKEN_FILE))]
    for name in finished[:max(0, len(finished) - keep)]:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def write_token(session_dir, token):
    fd = os.open(os.path.join(session_dir, TOKEN_FILE), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token.hex())


def read_token(session_dir):
    path = os.path.join(session_dir, TOKEN_FILE)
    try:
        with open(path) as f:
            return bytes.fromhex(f.read().strip())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no cluster token at {path}: is this a minray session directory?") from None
    except ValueError:
        raise ValueError(f"the cluster token in {path} is damaged") from None


# Unix socket paths must fit in sockaddr_un (108 bytes on Linux).
MAX_SOCKET_PATH = 100


def node_socket_path(session_dir):
    """Where a session's node manager listens (shortened if the path is long)."""
    path = os.path.join(session_dir, "sockets", "node_manager")
    if len(path) <= MAX_SOCKET_PATH:
        return path
    import hashlib
    digest = hashlib.sha1(os.path.abspath(session_dir).encode()).hexdigest()[:16]
    return os.path.join("/tmp", f"minray-{digest}.sock")
