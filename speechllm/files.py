"""Files written whole or not at all: a reader (a resumed run, another process) never sees a torn one."""

import os
import tempfile


def write_atomically(path: str, write):
    """write(temporary_path) beside path, then renamed over it; the temporary file is removed if write fails."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".partial")
    os.close(handle)
    try:
        write(partial)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(partial, 0o666 & ~umask)  # as open() would have made it, not mkstemp's owner-only
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
