"""workers.txt: one host per line, `[user@]host[:port]`; `#` starts a comment."""
import re

# user@ is optional; an IPv6 address goes in brackets when a port follows.
_HOST_LINE = re.compile(r"^(?:(?P<user>[A-Za-z0-9._-]+)@)?"
                        r"(?:\[(?P<ipv6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9._-]+))"
                        r"(?::(?P<port>\d{1,5}))?$")


class WorkersFileError(ValueError):
    """workers.txt can't be used; the message names the file and line."""


class Host:
    """One line of workers.txt."""

    def __init__(self, host, user=None, port=None, line=None):
        self.host = host
        self.user = user
        self.port = port
        self.line = line

    @property
    def name(self):
        """How the host is shown in reports (as written in workers.txt)."""
        user = f"{self.user}@" if self.user else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{user}{host}" + (f":{self.port}" if self.port else "")

    def __repr__(self):
        return f"Host({self.name!r})"


def parse_workers(text, path="workers.txt"):
    """The hosts listed in text; WorkersFileError for a malformed line or none."""
    hosts, seen = [], {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _HOST_LINE.match(line)
        if match is None:
            raise WorkersFileError(
                f"{path}, line {number}: {raw.strip()!r} is not a host: write one host per "
                "line as [user@]host[:port] (e.g. ubuntu@10.0.0.5:22), # for comments")
        port = match.group("port")
        if port is not None and not 0 < int(port) < 65536:
            raise WorkersFileError(f"{path}, line {number}: port {port} is not between 1 and "
                                   "65535")
        host = Host(match.group("ipv6") or match.group("host"), match.group("user"),
                    int(port) if port else None, number)
        key = (host.host, host.port)
        if key in seen:
            raise WorkersFileError(f"{path}, line {number}: {host.name} is listed already on "
                                   f"line {seen[key]}")
        seen[key] = number
        hosts.append(host)
    if not hosts:
        raise WorkersFileError(f"{path} lists no hosts: write one host per line as "
                               "[user@]host[:port]")
    return hosts


def read_workers(path):
    try:
        with open(path) as f:
            text = f.read()
    except OSError as exc:
        raise WorkersFileError(f"can't read the workers file {path}: {exc.strerror}") from None
    return parse_workers(text, path)
