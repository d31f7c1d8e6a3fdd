"""``python -m relay.delivery INDEX PARENT_PID WAKE_FD``: a delivery worker, started by `relay serve`.

Its settings, log level and role arrive pickled on stdin from the parent (trusted: the same program).
"""

import pickle
import sys

from relay.delivery.process import main

if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.stdin.isatty():
        sys.exit("python -m relay.delivery: a delivery worker, started by `relay serve`; not a command")
    index, parent_pid, wake_fd = map(int, sys.argv[1:4])
    settings, log_level, followups = pickle.loads(sys.stdin.buffer.read())
    main(settings, index, parent_pid, log_level, wake_fd, followups)
