"""Shared by the tests that start other processes: a free port, and the processes below one."""
import os
import socket


def free_port():
    """A TCP port nobody listens on now (bound to port 0, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid):
    """Every process below ``pid``, from /proc (Linux; elsewhere none are found)."""
    children = {}
    for d in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])   # "pid (comm) state ppid ..."
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


class SignalsItself:
    """A dataset whose worker receives a SIGINT while reading item 1, as every process of a
    terminal's process group does on a Ctrl-C (picklable: DataLoader workers under spawn)."""

    def __init__(self, n=4):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        import signal

        import torch
        if i == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return torch.full((3,), float(i)), i % 2


def signal_then_rebuild(marker, cls, state):
    """Unpickles ``cls`` with ``state`` in a spawned DataLoader worker; the first time (no
    ``marker`` file yet), first sends SIGINT to the parent and to this worker, as a terminal's
    Ctrl-C reaches every process of its group while the worker starts."""
    import signal
    if not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getppid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
    obj = cls.__new__(cls)
    obj.__dict__.update(state)
    return obj
