"""blogin: relay the terminal to the VM's serial console socket until Ctrl-]."""

from __future__ import annotations

import os
import select
import socket
import sys
import termios
import tty

from cbsd.errors import CbsdError

DETACH = b"\x1d"  # Ctrl-]


def attach(sock_path: str, jname: str) -> int:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(sock_path)
    except OSError as e:
        raise CbsdError(f"{jname}: cannot attach to the console: {e.strerror}") from e
    stdin = sys.stdin.fileno()
    tty_mode = termios.tcgetattr(stdin) if os.isatty(stdin) else None
    print(f"Connected to {jname}'s console. Escape character is ^]", file=sys.stderr)
    try:
        if tty_mode is not None:
            tty.setraw(stdin)
        while True:
            ready, _, _ = select.select([stdin, s], [], [])
            if s in ready:
                data = s.recv(65536)
                if not data:
                    break
                os.write(sys.stdout.fileno(), data)
            if stdin in ready:
                data = os.read(stdin, 1024)
                if not data or DETACH in data:
                    if data and DETACH in data:
                        s.sendall(data.split(DETACH)[0])
                    break
                s.sendall(data)
    finally:
        if tty_mode is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, tty_mode)
        s.close()
    print(f"\r\nDetached from {jname}'s console.", file=sys.stderr)
    return 0
