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


def new_session_id():
    return time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}-{secrets.token_hex(3)}"


def create_session_dir(session_id=None, root=None):
    """Create a fresh session directory with its token; return its path."""
    root = root or SESSION_ROOT
    os.makedirs(root, mode=0o700, exist_ok=True)
    path = os.path.join(root, f"session-{session_id or new_session_id()}")
    os.makedirs(path, mode=0o700)
    write_token(path, secrets.token_bytes(32))
    return path


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
