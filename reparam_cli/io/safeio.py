"""Outputs that are never half-written, published without a race; inputs that are plain files.

    atomic_output(path, overwrite=False)   write to an unnamed file, publish it whole at `path`
    open_folder(path, follow=True)         a folder descriptor (follow=False: refuse a symlink)
    pinned_folder(path, fd)                writes to files in `path` go through the descriptor `fd`
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
owner process (same host, that pid) is gone. The same rule removes the hidden name of an
`--overwrite` run killed between its link and its rename.

Symbolic links inside the output folder (Linux `openat` family): the output's folder is opened
once (`open_folder`); the unnamed file, the hidden temporary, the link, the final rename
(`renameat`/`renameat2` with both folder descriptors) and the cleanup of stale temporaries all
name entries relative to that descriptor, never by path again. A folder path the user named is
resolved once, when the write starts (a symlink the user put in that path is theirs to choose and is
followed then); a component swapped for a symlink after that redirects nothing. The batch opens its
output folder once and every subfolder it creates with O_NOFOLLOW, and pins them (`pinned_folder`)
so that writers deep in the pipeline use those descriptors.
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
_LIVE: dict[object, tuple[int, str]] = {}  # (folder fd, name) of named temporaries this process is writing
# (removed by signal handlers)
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
    or socket (those are never replaced by a regular file), nor an existing file without `overwrite`.
    Hidden temporaries of killed runs in its folder are removed first (see `clean_stale_temps`), so a
    run refused here still leaves the folder clean."""
    _clean_once(path.parent)
    _refuse_existing(path, overwrite, os.stat, path)
    if not path.parent.is_dir():
        raise OutputError(f"output folder does not exist: {path.parent}")


_REASONS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
            errno.EFBIG: "file too large for this filesystem or limit", errno.EROFS: "read-only filesystem",
            errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
            errno.EIO: "input/output error", errno.ELOOP: "a symbolic link where none is followed",
            errno.ENOTDIR: "a part of the path is not a folder"}


def os_reason(exc: OSError) -> str:
    """The reason of an OSError in words (full disk, quota, read-only filesystem, permissions, ...)."""
    return _REASONS.get(exc.errno, exc.strerror or type(exc).__name__)


def os_error_sentence(exc: OSError) -> str:
    """One sentence for an OSError that no caller put in words: the file(s) it names and the reason."""
    names = " -> ".join(os.fsdecode(f) if isinstance(f, bytes) else str(f)
                        for f in (exc.filename, exc.filename2) if f is not None)
    reason = os_reason(exc)
    return f"{names}: {reason}" if names else f"a file operation failed: {reason}"


def write_error(exc: OSError, path: Path) -> OutputError:
    """One sentence for an OSError while writing `path` (full disk, quota, permissions, ...)."""
    return OutputError(f"cannot write {path}: {os_reason(exc)}; nothing was written")


def _temp_basename(name: str, suffix: str) -> str:
    return f".{name}.reparam-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp{suffix}"


def _temp_name(folder: Path, name: str, suffix: str) -> Path:
    return folder / _temp_basename(name, suffix)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def open_folder(path: str | Path, follow: bool = True, dir_fd: int | None = None) -> int:
    """A descriptor of the folder `path` (relative to `dir_fd` when given). With `follow=False` a
    symbolic link as its last component is refused (ELOOP/ENOTDIR), never followed."""
    return os.open(path, _DIR_FLAGS | (0 if follow else _NOFOLLOW), dir_fd=dir_fd)


# Folders a caller opened once (the batch's output folders): atomic_output on a path in one of them
# works through that descriptor instead of resolving the folder's path again. Each entry: [fd, cleaned].
_PINNED: dict[str, list] = {}


def _folder_key(folder: str | Path) -> str:
    return os.path.normpath(os.path.abspath(os.fspath(folder)))


@contextlib.contextmanager
def pinned_folder(folder: str | Path, fd: int) -> Iterator[None]:
    """Within the block, outputs written to `folder` go through the descriptor `fd` (which the
    caller opened, and closes): a path component swapped for a symlink meanwhile changes nothing."""
    key = _folder_key(folder)
    saved = _PINNED.get(key)
    _PINNED[key] = [fd, False]
    try:
        yield
    finally:
        if saved is None:
            _PINNED.pop(key, None)
        else:
            _PINNED[key] = saved


def clean_stale_temps(folder: Path | int) -> list[str]:
    """Remove named temporaries in `folder` (a path, or a folder descriptor) left by reparam processes
    of this host that are gone (SIGKILLed while writing, or between the hidden link and the final
    rename of --overwrite). Returns the names removed."""
    removed = []
    dir_fd = folder if isinstance(folder, int) else None
    try:
        if dir_fd is None:
            dir_fd = open_folder(folder)
            close = True
        else:
            close = False
    except OSError:
        return removed
    try:
        try:
            names = os.listdir(dir_fd)
        except OSError:
            return removed
        for name in names:
            m = _TEMP.match(name)
            if m and m["host"] == _HOST and int(m["pid"]) != os.getpid() and not _pid_alive(int(m["pid"])):
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=dir_fd)
                    removed.append(name)
    finally:
        if close:
            os.close(dir_fd)
    return removed


def _clean_once(folder: Path) -> None:
    """clean_stale_temps(folder), once per pinned folder (a batch writes thousands of files to one)."""
    pinned = _PINNED.get(_folder_key(folder))
    if pinned is None:
        clean_stale_temps(folder)
    elif not pinned[1]:
        clean_stale_temps(pinned[0])
        pinned[1] = True


def remove_live_temps() -> None:
    """Delete the named temporaries this process is writing (for a signal handler about to exit)."""
    for dir_fd, name in list(_LIVE.values()):
        with contextlib.suppress(OSError):
            os.unlink(name, dir_fd=dir_fd)


def _open_unnamed(folder: int) -> int | None:
    """An O_TMPFILE descriptor in the folder (a descriptor) reachable as /proc/self/fd/N, or None
    where unsupported."""
    if not hasattr(os, "O_TMPFILE"):
        return None
    try:  # the umask applies, as for any new file
        fd = os.open(".", os.O_TMPFILE | os.O_RDWR | getattr(os, "O_CLOEXEC", 0), 0o666, dir_fd=folder)
    except (OSError, TypeError):
        return None
    if not os.path.exists(f"/proc/self/fd/{fd}"):
        os.close(fd)
        return None
    return fd


def _link_unnamed(fd: int, dir_fd: int, name: str) -> None:
    """Give the unnamed file `fd` the name `name` in the folder `dir_fd`; FileExistsError when taken."""
    try:  # linkat(AT_FDCWD, "/proc/self/fd/N", dir_fd, name, AT_SYMLINK_FOLLOW)
        os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=dir_fd, follow_symlinks=True)
        return
    except FileExistsError:
        raise
    except OSError:
        pass  # some kernels/sandboxes refuse linking through /proc (EXDEV): try AT_EMPTY_PATH
    libc = _libc()
    if libc is not None and libc.linkat(fd, b"", dir_fd, os.fsencode(name), _AT_EMPTY_PATH) == 0:
        return
    err = ctypes.get_errno() if libc is not None else 0
    if err == errno.EEXIST:
        raise FileExistsError(err, os.strerror(err), name)
    # Last resort: copy the bytes to a named temporary and publish that.
    tmp = _temp_basename(name, Path(name).suffix)
    key = object()
    _LIVE[key] = (dir_fd, tmp)
    try:
        out_fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | _NOFOLLOW | getattr(os, "O_CLOEXEC", 0),
                         0o666, dir_fd=dir_fd)
        with open(out_fd, "wb") as out:
            offset = 0
            while chunk := os.pread(fd, 1 << 20, offset):
                out.write(chunk)
                offset += len(chunk)
        _rename_noreplace(dir_fd, tmp, name)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        _LIVE.pop(key, None)


def _rename_noreplace(dir_fd: int, src: str, dst: str) -> None:
    """Rename `src` to `dst` (both in the folder `dir_fd`) unless `dst` exists (FileExistsError):
    renameat2(RENAME_NOREPLACE), else a hard link + unlink, else (filesystems without hard links) a
    check followed by a rename."""
    libc = _libc()
    renameat2 = getattr(libc, "renameat2", None) if libc is not None else None
    if renameat2 is not None:
        if renameat2(dir_fd, os.fsencode(src), dir_fd, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(err, os.strerror(err), dst)
    try:
        os.link(src, dst, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
    except FileExistsError:
        raise
    except OSError:
        try:
            os.stat(dst, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            os.rename(src, dst, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            return
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst) from None
    os.unlink(src, dir_fd=dir_fd)


def _before_replace() -> None:
    """Called between the hidden link and the final rename of --overwrite (a seam for tests that
    kill the process exactly there)."""


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


def _publish(fd: int, unnamed: bool, dir_fd: int, tmp: str, path: Path, overwrite: bool) -> None:
    """Give the finished file (`fd`: unnamed, or named `tmp` in the folder) the name `path.name` in
    the folder `dir_fd` (or hold it, see HeldOutput). Every name is resolved relative to `dir_fd`."""
    held = _HELD.get(path)
    if held is not None:
        held.fd = os.dup(fd)
        return
    name = path.name
    if not unnamed:
        if overwrite:
            _before_replace()
            os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        else:
            _rename_noreplace(dir_fd, tmp, name)
        return
    if not overwrite:
        _link_unnamed(fd, dir_fd, name)
        return
    named = _temp_basename(name, path.suffix)
    key = object()
    _LIVE[key] = (dir_fd, named)
    try:
        _link_unnamed(fd, dir_fd, named)
        _before_replace()
        os.replace(named, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(named, dir_fd=dir_fd)
        _LIVE.pop(key, None)


def _check_target(dir_fd: int, path: Path, overwrite: bool) -> None:
    """check_output_target, relative to the folder's descriptor."""
    _refuse_existing(path, overwrite, lambda name: os.stat(name, dir_fd=dir_fd), path.name)


def _refuse_existing(path: Path, overwrite: bool, stat_of, name) -> None:
    """Raise OutputError when what `stat_of(name)` finds may not be replaced by the output `path`."""
    try:
        st = stat_of(name)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise OutputError(f"cannot use {path} as the output: {exc.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise OutputError(f"output {path} is a directory", hint="name a file, e.g. -o DIR/model.deploy.safetensors")
    if not stat.S_ISREG(st.st_mode):
        raise OutputError(f"output {path} is a {_kind(st.st_mode)}, not a regular file, so it is not replaced",
                          hint="to stream, pass -o - and redirect stdout")
    if not overwrite:
        raise OutputError(f"output {path} already exists", hint="pass --overwrite to replace it")


@contextlib.contextmanager
def atomic_output(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a path to write the output to; when the block completes, publish it at `path` whole.

    On any error, signal or kill nothing appears at `path` (see the module doc). Without `overwrite`,
    an existing `path`, or one that appears meanwhile (a concurrent run), raises OutputError and is
    left alone. A folder, FIFO or device at `path` is refused either way. An OSError raised by the
    block (a full disk) becomes one OutputError sentence naming `path`.

    The output's folder is opened once (a folder pinned by the caller, see `pinned_folder`, is used
    as it is); every later step (the file, the hidden temporary, the link, the rename, the cleanup)
    is relative to that descriptor, so swapping a component of the path for a symbolic link while
    the run writes cannot move the output, or anything this function does, to another folder.
    """
    path = Path(path)
    if not path.name or path.name in (".", ".."):
        raise OutputError(f"output {path} is a directory", hint="name a file, e.g. -o DIR/model.deploy.safetensors")
    pinned = _PINNED.get(_folder_key(path.parent))
    if pinned is not None:
        dir_fd = os.dup(pinned[0])
    else:
        try:
            dir_fd = open_folder(path.parent)  # the folder the user named: a link they named is followed, once
        except FileNotFoundError:
            raise OutputError(f"output folder does not exist: {path.parent}") from None
        except NotADirectoryError:
            raise OutputError(f"output folder is not a folder: {path.parent}") from None
        except OSError as exc:
            raise write_error(exc, path) from None
    fd: int | None = None
    tmp = ""
    key = object()
    try:
        if pinned is None or not pinned[1]:  # a run killed while writing, or at the rename step, left these
            clean_stale_temps(dir_fd)
            if pinned is not None:
                pinned[1] = True
        _check_target(dir_fd, path, overwrite)
        fd = _open_unnamed(dir_fd)
        unnamed = fd is not None
        if not unnamed:
            tmp = _temp_basename(path.name, path.suffix)
            _LIVE[key] = (dir_fd, tmp)
            try:
                fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_RDWR | _NOFOLLOW | getattr(os, "O_CLOEXEC", 0),
                             0o666, dir_fd=dir_fd)
            except OSError as exc:
                raise write_error(exc, path) from None
        proc = Path(f"/proc/self/fd/{fd}")
        writable = proc if os.path.exists(proc) else path.parent / tmp  # (no /proc: by name, as a last resort)
        try:
            yield writable
        except OSError as exc:
            raise write_error(exc, path) from None
        try:
            os.fsync(fd)  # on the disk before it gets its name: a power cut leaves no output or a whole one
            _publish(fd, unnamed, dir_fd, tmp, path, overwrite)
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
        if tmp:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
            _LIVE.pop(key, None)
        os.close(dir_fd)


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


def _clean_dead_private(base: str) -> None:
    """Remove the private folders (see private_tmpdir) of this host's reparam processes that are gone."""
    import shutil

    with contextlib.suppress(OSError):
        for entry in os.scandir(base):
            m = _PRIVATE.match(entry.name)
            if m and m["host"] == _HOST and int(m["pid"]) != os.getpid() and not _pid_alive(int(m["pid"])):
                shutil.rmtree(entry.path, ignore_errors=True)


@contextlib.contextmanager
def private_compiler_cache() -> Iterator[None]:
    """Within the block, torch's compiler cache ($TORCHINDUCTOR_CACHE_DIR) is a private folder in
    $TMPDIR, removed afterwards. torch creates that folder (`$TMPDIR/torchinductor_USER` by default)
    as soon as torch._dynamo is imported, which some plain tensor operations do on first use, so
    without this a conversion could leave it behind. A cache the user chose, or one torch already
    created in this process, is left as it is; a killed run's folder is removed by the next run."""
    import sys
    import tempfile

    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") is not None or "torch._dynamo" in sys.modules:
        yield
        return
    import shutil

    base = tempfile.gettempdir()
    _clean_dead_private(base)
    folder = Path(base) / f".reparam-private-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder / "inductor")  # created only if torch needs it
    try:
        yield
    finally:
        if os.environ.get("TORCHINDUCTOR_CACHE_DIR") == str(folder / "inductor"):
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def private_tmpdir() -> Iterator[Path]:
    """Within the block, $TMPDIR (TMP, TEMP, tempfile.tempdir) and torch's compile cache point at a
    private folder that is removed afterwards: what exporters and runtimes drop there (onnxruntime's
    `.ses`, torch inductor's cache) does not outlive the run. Folders of killed runs of this host are
    removed by the next one."""
    import shutil
    import tempfile

    base = tempfile.gettempdir()
    _clean_dead_private(base)
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
