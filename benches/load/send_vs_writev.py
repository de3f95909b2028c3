#!/usr/bin/env python3
"""Kernel time of one small write on loopback TCP: send(2) of one buffer against writev(2)
of the same bytes in two pieces (a response head and body) or in one.

    taskset -c 1 python3 benches/load/send_vs_writev.py [COUNT]

Prints system and user CPU time per call, three rounds of each, from getrusage. On
loopback the sender's system call also delivers the bytes to the receiving socket, so
the figure is the whole kernel cost of the write. The reader is a child process that
drains the socket. Loopback only; bounded by COUNT (default 300,000) writes per round.
"""

import os
import resource
import socket
import sys

COUNT = int(sys.argv[1]) if len(sys.argv) > 1 else 300_000
HEAD = b"h" * 150
BODY = b"b" * 90


def main():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    reader = os.fork()
    if reader == 0:
        conn, _ = server.accept()
        while conn.recv(1 << 20):
            pass
        os._exit(0)
    sender = socket.create_connection(server.getsockname())
    sender.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    fd = sender.fileno()
    whole = HEAD + BODY
    writes = {
        "send, one buffer": lambda: sender.send(whole),
        "writev, two pieces": lambda: os.writev(fd, [HEAD, BODY]),
        "writev, one piece": lambda: os.writev(fd, [whole]),
    }
    for _ in range(3):
        for name, write in writes.items():
            before = resource.getrusage(resource.RUSAGE_SELF)
            for _ in range(COUNT):
                write()
            after = resource.getrusage(resource.RUSAGE_SELF)
            system = (after.ru_stime - before.ru_stime) / COUNT * 1e6
            user = (after.ru_utime - before.ru_utime) / COUNT * 1e6
            print(f"{name:20} system {system:.3f} µs  user {user:.3f} µs per call")
    sender.close()
    os.waitpid(reader, 0)


if __name__ == "__main__":
    main()
