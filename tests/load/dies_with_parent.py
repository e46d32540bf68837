"""Runs a command that dies with the test that started it: tests/load.rs starts the
carousel binary through this, so that a test killed for running too long (SIGKILL skips
the test's own clean-up) leaves no carousel holding thousands of sockets behind.

Usage: python3 dies_with_parent.py PROGRAM [ARG ...]

Sets the parent-death signal (kept across exec), raises the soft descriptor limit to
the hard one, then becomes PROGRAM, with the same process id.
"""

import ctypes
import os
import resource
import signal
import sys

PR_SET_PDEATHSIG = 1

libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
    sys.exit("prctl(PR_SET_PDEATHSIG): " + os.strerror(ctypes.get_errno()))
if os.getppid() == 1:
    sys.exit("the parent is already gone")
_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
os.execv(sys.argv[1], sys.argv[1:])
