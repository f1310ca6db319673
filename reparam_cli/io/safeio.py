"""Outputs that are never half-written, published without a race; inputs that are plain files.

    atomic_output(path, overwrite=False)   write to an unnamed file, publish it whole at `path`
    check_output_target(path, overwrite)   refuse folders, FIFOs, devices; existing files without overwrite
    guarded_writer(path)                   a file object whose write errors surface after torch's writer returns
    check_input_file(path)                 a regular, non-sparse file whose first bytes look like a checkpoint
    remove_live_temps()                    delete this process's named temporaries (signal handlers)

How an output is written (Linux): the bytes go to an *unnamed* file made with `O_TMPFILE` in the
target's folder; writers that need a file name get `/proc/self/fd/N`. Only when the file is complete
(and checked) is it linked into the folder under its name, so a process killed at any point, even
by SIGKILL, leaves nothing behind: the kernel frees an unnamed file when its last descriptor closes.
Without `--overwrite` the link itself is the no-replace primitive (it fails when the name exists), so
of two runs racing for one output exactly one wins. With `--overwrite` the file is linked under a
hidden temporary name and renamed over the target (rename replaces atomically).

Where `O_TMPFILE` is missing (other filesystems, other systems) the file is written under a hidden
named temporary `.NAME.reparam-HOST-PID-RANDOM.tmpSUFFIX` beside the target and published with
`renameat2(RENAME_NOREPLACE)` (or hard link + unlink); such a temporary is removed on any error or
signal, and one left by a SIGKILLed run is removed by the next run writing to that folder once its
owner process (same host, that pid) is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import io
import os
import re
import socket
import stat
import uuid
from pathlib import Path
from typing import BinaryIO, Iterator

from reparam_cli.errors import CheckpointError, OutputError

_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000
_RENAME_NOREPLACE = 1
_HOST = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())[:32] or "host"
_TEMP = re.compile(r"^\..*\.reparam-(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)-[0-9a-f]{8}\.tmp")
_LIVE: set[Path] = set()  # named temporaries this process is writing (removed by signal handlers)
_HELD: dict[Path, "HeldOutput"] = {}  # outputs kept unnamed and open for streaming (stdout)


def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "named pipe (FIFO)"
    if stat.S_ISCHR(mode):
        return "character device"
    if stat.S_ISBLK(mode):
        return "block device"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "special file"


# --- outputs --------------------------------------------------------------------------------------

def check_output_target(path: Path, overwrite: bool) -> None:
    """Raise OutputError unless `path` may become the output: it must not be a folder, FIFO, device
    or socket (those are never replaced by a regular file), nor an existing file without `overwrite`."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise OutputError(f"cannot use {path} as the output: {exc.strerror}") from None
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise OutputError(f"output {path} is a directory", hint="name a file, e.g. -o DIR/model.deploy.safetensors")
        if not stat.S_ISREG(st.st_mode):
            raise OutputError(f"output {path} is a {_kind(st.st_mode)}, not a regular file, so it is not replaced",
                              hint="to stream, pass -o - and redirect stdout")
        if not overwrite:
            raise OutputError(f"output {path} already exists", hint="pass --overwrite to replace it")
    if not path.parent.is_dir():
        raise OutputError(f"output folder does not exist: {path.parent}")


def write_error(exc: OSError, path: Path) -> OutputError:
    """One sentence for an OSError while writing `path` (full disk, quota, permissions, ...)."""
    reason = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
              errno.EFBIG: "file too large for this filesystem or limit", errno.EROFS: "read-only filesystem",
              errno.EACCES: "permission denied", errno.EPERM: "operation not permitted"}.get(
                  exc.errno, exc.strerror or type(exc).__name__)
    return OutputError(f"cannot write {path}: {reason}; nothing was written")


def _temp_name(folder: Path, name: str, suffix: str) -> Path:
    return folder / f".{name}.reparam-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp{suffix}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temps(folder: Path) -> list[str]:
    """Remove named temporaries in `folder` left by reparam processes of this host that are gone
    (a SIGKILLed run on a filesystem without O_TMPFILE). Returns the names removed."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP.match(entry.name)
        if m and m["host"] == _HOST and int(m["pid"]) != os.getpid() and not _pid_alive(int(m["pid"])):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
                removed.append(entry.name)
    return removed


def remove_live_temps() -> None:
    """Delete the named temporaries this process is writing (for a signal handler about to exit)."""
    for path in list(_LIVE):
        with contextlib.suppress(OSError):
            os.unlink(path)


def _open_unnamed(folder: Path) -> int | None:
    """An O_TMPFILE descriptor in `folder` reachable as /proc/self/fd/N, or None where unsupported."""
    if not hasattr(os, "O_TMPFILE"):
        return None
    try:
        fd = os.open(folder, os.O_TMPFILE | os.O_RDWR, 0o666)  # the umask applies, as for any new file
    except OSError:
        return None
    if not os.path.exists(f"/proc/self/fd/{fd}"):
        os.close(fd)
        return None
    return fd


def _link_unnamed(fd: int, target: Path) -> None:
    """Give the unnamed file `fd` the name `target`; FileExistsError when that name is taken."""
    try:
        os.link(f"/proc/self/fd/{fd}", target, follow_symlinks=True)  # linkat(AT_SYMLINK_FOLLOW)
        return
    except FileExistsError:
        raise
    except OSError:
        pass  # some kernels/sandboxes refuse linking through /proc (EXDEV): try AT_EMPTY_PATH
    libc = _libc()
    if libc is not None and libc.linkat(fd, b"", _AT_FDCWD, os.fsencode(target), _AT_EMPTY_PATH) == 0:
        return
    err = ctypes.get_errno() if libc is not None else 0
    if err == errno.EEXIST:
        raise FileExistsError(err, os.strerror(err), str(target))
    # Last resort: copy the bytes to a named temporary and publish that.
    tmp = _temp_name(target.parent, target.name, target.suffix)
    _LIVE.add(tmp)
    try:
        with open(tmp, "xb") as out:
            offset = 0
            while chunk := os.pread(fd, 1 << 20, offset):
                out.write(chunk)
                offset += len(chunk)
        _rename_noreplace(tmp, target)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        _LIVE.discard(tmp)


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Rename `src` to `dst` unless `dst` exists (FileExistsError): renameat2(RENAME_NOREPLACE), else
    a hard link + unlink, else (filesystems without hard links) a check followed by a rename."""
    libc = _libc()
    renameat2 = getattr(libc, "renameat2", None) if libc is not None else None
    if renameat2 is not None:
        if renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(err, os.strerror(err), str(dst))
    try:
        os.link(src, dst)
    except FileExistsError:
        raise
    except OSError:
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst)) from None
        os.rename(src, dst)
        return
    os.unlink(src)


def _sync(fd: int | None, tmp: Path) -> None:
    """Flush the finished file to the disk before it gets its name: a power cut then leaves either
    no output or a whole one, never a named empty file."""
    if fd is not None:
        os.fsync(fd)
        return
    sync_fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(sync_fd)
    finally:
        os.close(sync_fd)


class HeldOutput:
    """An output that never gets a name (for `-o -`): `atomic_output(held.path)` writes it as usual
    (unnamed, in $TMPDIR) but instead of publishing it keeps it open here; `copy_to` then streams it,
    and `close` (or the end of the process, even by SIGKILL) frees it."""

    def __init__(self, suffix: str = ""):
        import tempfile

        self.path = Path(tempfile.gettempdir()) / f".reparam-held-{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}"
        self.fd: int | None = None
        _HELD[self.path] = self

    def copy_to(self, stream: BinaryIO) -> None:
        if self.fd is None:
            raise OutputError("no output was written")
        offset = 0
        while chunk := os.pread(self.fd, 1 << 20, offset):
            stream.write(chunk)
            offset += len(chunk)
        stream.flush()

    def close(self) -> None:
        _HELD.pop(self.path, None)
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "HeldOutput":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _publish(fd: int | None, tmp: Path, path: Path, overwrite: bool) -> None:
    """Give the finished file (unnamed `fd`, or named `tmp`) the name `path` (or hold it, see HeldOutput)."""
    held = _HELD.get(path)
    if held is not None:
        held.fd = os.dup(fd) if fd is not None else os.open(tmp, os.O_RDONLY)
        return
    if fd is None:
        if overwrite:
            os.replace(tmp, path)
        else:
            _rename_noreplace(tmp, path)
        return
    if not overwrite:
        _link_unnamed(fd, path)
        return
    named = _temp_name(path.parent, path.name, path.suffix)
    _LIVE.add(named)
    try:
        _link_unnamed(fd, named)
        os.replace(named, path)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(named)
        _LIVE.discard(named)


@contextlib.contextmanager
def atomic_output(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a path to write the output to; when the block completes, publish it at `path` whole.

    On any error, signal or kill nothing appears at `path` (see the module doc). Without `overwrite`,
    an existing `path`, or one that appears meanwhile (a concurrent run), raises OutputError and is
    left alone. A folder, FIFO or device at `path` is refused either way. An OSError raised by the
    block (a full disk) becomes one OutputError sentence naming `path`.
    """
    path = Path(path)
    check_output_target(path, overwrite)
    fd = _open_unnamed(path.parent)
    if fd is not None:
        if overwrite:  # the replace step names a hidden temporary: a run killed there leaves it for this one
            clean_stale_temps(path.parent)
        tmp = Path(f"/proc/self/fd/{fd}")
    else:  # only here can earlier runs have left named temporaries (a listing per output costs)
        clean_stale_temps(path.parent)
        tmp = _temp_name(path.parent, path.name, path.suffix)
        _LIVE.add(tmp)
    try:
        if fd is None:
            try:
                os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            except OSError as exc:
                raise write_error(exc, path) from None
        try:
            yield tmp
        except OSError as exc:
            raise write_error(exc, path) from None
        try:
            _sync(fd, tmp)
            _publish(fd, tmp, path, overwrite)
        except FileExistsError:
            raise OutputError(f"output {path} already exists (it appeared while this run was writing)",
                              hint="pass --overwrite to replace it") from None
        except IsADirectoryError:
            raise OutputError(f"output {path} is a directory") from None
        except OSError as exc:
            raise write_error(exc, path) from None
    finally:
        if fd is not None:
            os.close(fd)
        else:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            _LIVE.discard(tmp)


class GuardedWriter(io.RawIOBase):
    """A writable, seekable file object over `raw` that never raises from write(): the first OSError
    (a full disk) is kept in `.error` and later writes are dropped. torch's C++ writers abort the
    process when a write fails under them; behind this they finish, and the caller raises `.error`."""

    def __init__(self, raw: BinaryIO):
        super().__init__()
        self.raw = raw
        self.error: OSError | None = None
        self.pos = 0

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, data) -> int:
        n = memoryview(data).nbytes
        if self.error is None:
            try:
                self.raw.write(data)
            except OSError as exc:
                self.error = exc
        self.pos += n
        return n

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == io.SEEK_SET:
            self.pos = offset
        elif whence == io.SEEK_CUR:
            self.pos += offset
        elif self.error is None:
            self.pos = self.raw.seek(0, io.SEEK_END) + offset
        if self.error is None:
            self.raw.seek(self.pos)
        return self.pos

    def flush(self) -> None:
        if self.error is None:
            try:
                self.raw.flush()
            except OSError as exc:
                self.error = exc


@contextlib.contextmanager
def guarded_writer(path: str | Path) -> Iterator[GuardedWriter]:
    """Open `path` for writing behind a GuardedWriter; raise its first write error at the end."""
    with open(path, "wb") as raw:
        writer = GuardedWriter(raw)
        yield writer
        writer.flush()
    if writer.error is not None:
        raise writer.error


# --- inputs ---------------------------------------------------------------------------------------

_SPARSE_MIN = 64 << 20  # below this, a file with holes costs nothing to read


def check_input_file(path: str | Path, what: str = "checkpoint") -> os.stat_result:
    """Raise CheckpointError unless `path` is a regular file that reading and hashing can finish:
    not a folder, FIFO, device or socket (e.g. /dev/zero, a process substitution `<(...)`), and not a
    huge sparse file (mostly holes: gigabytes of zeros a hash would read for minutes)."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CheckpointError(f"{what} not found: {path}") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise CheckpointError(f"{what} is a directory, not a file: {path}")
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{path} is a {_kind(st.st_mode)}, not a regular file",
                              hint="to read a stream, pass - and pipe it to stdin, e.g. `- < FILE`")
    allocated = st.st_blocks * 512
    if st.st_size >= _SPARSE_MIN and 0 < allocated < st.st_size // 8:
        raise CheckpointError(f"{path} is a sparse file ({st.st_size:,} bytes, {allocated:,} of them on disk), "
                              f"not a {what}")
    return st


_PRIVATE = re.compile(r"^\.reparam-private-(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)-[0-9a-f]{8}$")


@contextlib.contextmanager
def private_tmpdir() -> Iterator[Path]:
    """Within the block, $TMPDIR (TMP, TEMP, tempfile.tempdir) and torch's compile cache point at a
    private folder that is removed afterwards: what exporters and runtimes drop there (onnxruntime's
    `.ses`, torch inductor's cache) does not outlive the run. Folders of killed runs of this host are
    removed by the next one."""
    import shutil
    import tempfile

    base = tempfile.gettempdir()
    with contextlib.suppress(OSError):
        for entry in os.scandir(base):
            m = _PRIVATE.match(entry.name)
            if m and m["host"] == _HOST and int(m["pid"]) != os.getpid() and not _pid_alive(int(m["pid"])):
                shutil.rmtree(entry.path, ignore_errors=True)
    folder = Path(base) / f".reparam-private-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    folder.mkdir(mode=0o700)
    keys = ("TMPDIR", "TMP", "TEMP", "TORCHINDUCTOR_CACHE_DIR")
    saved_env, saved_dir = {k: os.environ.get(k) for k in keys}, tempfile.tempdir
    try:
        for k in keys[:3]:
            os.environ[k] = str(folder)
        if saved_env["TORCHINDUCTOR_CACHE_DIR"] is None:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder / "inductor")
        tempfile.tempdir = str(folder)
        yield folder
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        tempfile.tempdir = saved_dir
        shutil.rmtree(folder, ignore_errors=True)
