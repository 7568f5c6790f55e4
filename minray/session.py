"""A cluster session: its directory, id and secret token.

The head node makes the session directory (logs, LMDB files, sockets) and a
random token in a 0600 file inside it. Every connection proves it holds the
token (minray.wire), so only processes that can read that file, or were
handed the token, can talk to the cluster.

The session root, each session directory and the token file must be ours and
private: a root another user can write to would let them plant a session (and
a token they know) that `init(address="auto")` joins, after which their
"cluster" could send us pickles to load. minray refuses such paths and says
how to fix them.
"""
import os
import secrets
import stat
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


class UnsafeSessionPathError(PermissionError):
    """A session root, session directory or token file other users could
    control or read."""


def check_private(path, what, directory=True):
    """Refuse `path` unless it is ours, not a symlink, and closed to others.

    Raises UnsafeSessionPathError saying what is wrong and how to fix it;
    FileNotFoundError if it does not exist.
    """
    info = os.lstat(path)
    uid = os.getuid()
    mode = stat.S_IMODE(info.st_mode)
    wanted = "0700 directory" if directory else "0600 file"
    fix = (f"set MINRAY_SESSION_ROOT to a directory of your own (minray creates it "
           f"with mode 0700 if it does not exist), or remove {path} if it should not be there")
    if stat.S_ISLNK(info.st_mode):
        problem = f"a symbolic link (to {os.readlink(path)})"
    elif directory and not stat.S_ISDIR(info.st_mode):
        problem = "not a directory"
    elif not directory and not stat.S_ISREG(info.st_mode):
        problem = "not a regular file"
    elif info.st_uid != uid:
        problem = f"owned by uid {info.st_uid}, not by you (uid {uid})"
    elif mode & 0o077:
        problem = f"open to other users (mode {mode:04o})"
        fix = f"run `chmod {'700' if directory else '600'} {path}`, or " + fix
    else:
        return
    raise UnsafeSessionPathError(
        f"minray refuses the {what} {path}: it is {problem}. It holds cluster tokens and "
        f"sockets, so it must be a {wanted} that you own. To fix it, {fix}.")


def create_session_dir(session_id=None, root=None, token=None):
    """Create a fresh session directory with its token; return its path.

    A head makes a new random token; a node joining a cluster passes the
    cluster's `token` (bytes), so that its own clients and peers prove the same one.
    """
    root = root or SESSION_ROOT
    os.makedirs(root, mode=0o700, exist_ok=True)
    check_private(root, "session root")
    prune_finished_sessions(root, keep=KEEP_FINISHED_SESSIONS - 1)
    path = os.path.join(root, f"session-{session_id or new_session_id()}")
    os.makedirs(path, mode=0o700)
    write_token(path, secrets.token_bytes(32) if token is None else token)
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
    socket_path = node_socket_path(session_dir)
    if not socket_path.startswith(os.path.join(session_dir, "")):
        # Shortened into /tmp (see node_socket_path): a node manager killed
        # before it could remove it would leave it there for good.
        try:
            os.unlink(socket_path)
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


# What a node manager writes in its session directory once ready (address, pid, ...).
NODE_FILE = "node.json"


def write_token(session_dir, token):
    fd = os.open(os.path.join(session_dir, TOKEN_FILE), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token.hex())


def read_token(session_dir):
    path = os.path.join(session_dir, TOKEN_FILE)
    try:
        check_private(path, "cluster token file", directory=False)
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
