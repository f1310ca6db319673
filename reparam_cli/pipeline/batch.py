"""`reparam batch`: convert every checkpoint in a folder, in parallel, resumably, shardably.

    run_batch(input_dir, output_dir, spec, options)   -> summary dict; one manifest line per input

* Inputs: files matching the patterns (default *.pth *.pt *.ckpt *.safetensors *.bin), at the top
  of INPUT_DIR or (recursive) below it; hidden files and folders, the output folder, and deploy
  files (`*.deploy.*`, or safetensors carrying reparam's deploy metadata) are never inputs.
* Outputs mirror the layout: INPUT_DIR/a/b/x.pth -> OUTPUT_DIR/a/b/x.deploy.safetensors. Two
  inputs in one folder with the same stem (x.pth, x.pt) keep their suffix instead (x.pth.deploy...).
  The whole mapping is computed first and is injective, also when compared case-insensitively
  (a folder copied to macOS or Windows stays correct): names that would still collide get a short
  hash of their input path (x.pth.3f2a9c1d.deploy...). See `output_names`.
* What cannot be an input is a manifest line, never a silent omission: with `--recursive`, an
  unreadable subfolder or a symbolic link to a folder (not followed: no loops, no duplicates), and
  any matching name that is a dangling link, a link loop or not a regular file.
* Each conversion runs `pipeline.convert_checkpoint`, in this process for one job, else in a pool of
  spawned processes with torch.set_num_threads(cores // jobs) each. A failure is recorded and the
  batch goes on.
* The manifest (`manifest.jsonl`, or `manifest.shard-K-of-N.jsonl` for a shard) has one JSON line
  per input. A hidden `.NAME.partial` gets a `pending` line for every input before anything is
  converted, so an output that appears before a kill is always recorded somewhere, then one line per
  input as it finishes (flushed: a crash or a kill loses nothing). At the end the manifest is
  written whole; inputs this run did not reach keep their earlier line, and a failed input keeps its
  earlier usable line under `previous`, so a failed or interrupted plain run does not wipe what a
  later `--resume` needs. An exclusive lock keeps two runs from writing the same manifest.
  `--resume` reads every manifest in OUTPUT_DIR, partial ones included, and ignores lines it
  cannot parse (with a note).
* Names in manifest lines are lossless and printable (`storable` / `restored`): `relpath`, `input`
  and `output` are strict UTF-8 with any byte that is not UTF-8 shown as `\\xNN`; when that is not
  the exact name, `relpath_bytes` (`input_bytes`, `output_bytes`) holds the base64 of the exact bytes
  (`os.fsencode`), and --resume matches inputs by those.
* Files in OUTPUT_DIR are reached through one descriptor of it, opened once (a worker opens it by
  path once and checks it is the same folder); the mirrored subfolders are created and opened
  relative to it with O_NOFOLLOW, and writers below use those descriptors (`safeio.pinned_folder`):
  a symbolic link planted in OUTPUT_DIR, or swapped in for one of its subfolders mid-run, fails that
  file (or, as the partial manifest, the batch) and redirects nothing.
* Workers die with the batch: each asks the kernel for SIGKILL when its parent dies
  (PR_SET_PDEATHSIG), so `kill -9` of the batch stops every conversion at once.
* Shard K/N takes the inputs whose relative path hashes (sha256) to K mod N: stable per file, so
  the N shards of a job array partition the folder exactly even if they list it at different times,
  and they write disjoint outputs and their own manifests.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fnmatch
import hashlib
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from reparam_cli.core.machine import cpu_count
from reparam_cli.core.messages import describe
from reparam_cli.core.spec import ModelSpec
from reparam_cli.errors import OutputError, ReparamError, VerificationFailed
from reparam_cli.io.formats import FORMATS, SUFFIX
from reparam_cli.io.metadata import decode_metadata, is_deploy_metadata
from reparam_cli.io.safeio import atomic_output, open_folder, os_reason, pinned_folder, remove_live_temps
from reparam_cli.io.signals import interrupts_as_exceptions
from reparam_cli.pipeline.options import ConvertOptions

DEFAULT_PATTERNS = ("*.pth", "*.pt", "*.ckpt", "*.safetensors", "*.bin")
MANIFEST = "manifest.jsonl"
CONVERTED, FAILED, SKIPPED, PENDING = "converted", "failed", "skipped", "pending"

Entry = dict[str, Any]  # one manifest line


class BatchError(ReparamError):
    """A batch cannot start: bad folder, bad --shard, nothing to convert, manifest in use."""



# --- planning -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count` (index from 0)."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str | None) -> "Shard":
        if not text:
            return cls()
        k, sep, n = text.partition("/")
        try:
            shard = cls(int(k), int(n)) if sep else None
        except ValueError:
            shard = None
        if shard is None or shard.count < 1 or not 0 <= shard.index < shard.count:
            raise BatchError(f"bad --shard {text!r}", hint="write K/N with 0 <= K < N, e.g. 0/4 for the first of 4")
        return shard

    def takes(self, relpath: str) -> bool:
        """Whether this shard owns `relpath` (POSIX, relative to the input folder)."""
        digest = hashlib.sha256(relpath.encode("utf-8", "surrogateescape")).digest()
        return int.from_bytes(digest[:8], "big") % self.count == self.index

    @property
    def manifest_name(self) -> str:
        return MANIFEST if self.count == 1 else f"manifest.shard-{self.index}-of-{self.count}.jsonl"


def _is_deploy_output(path: Path) -> bool:
    """An output of an earlier run: named *.deploy.*, or safetensors carrying reparam's deploy metadata."""
    if path.stem.endswith(".deploy"):
        return True
    if path.suffix != ".safetensors":
        return False
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 2 <= size < 1 << 26:
                return False
            header = json.loads(f.read(size))
    except (OSError, ValueError, RecursionError):
        return False  # unreadable: let the conversion report it

    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return isinstance(meta, dict) and is_deploy_metadata(decode_metadata(meta))


def _matches(relpath: str, patterns: Iterable[str]) -> bool:
    """A pattern with a '/' matches the relative path, one without matches the file name."""
    name = relpath.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatchcase(relpath if "/" in p else name, p) for p in patterns)


def _not_an_input(path: Path) -> str | None:
    """Why a matching name cannot be converted (a dangling link, a link loop, not a regular file), or None."""
    import stat

    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "a dangling symbolic link" if os.path.islink(path) else "vanished while listing"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "a symbolic link loop"
        return f"cannot be read: {exc.strerror}"
    if stat.S_ISREG(st.st_mode):
        return None
    return "not a regular file (a FIFO, device or socket)"


def discover(input_dir: Path, patterns: Iterable[str] = DEFAULT_PATTERNS, recursive: bool = False,
             exclude: Path | None = None, problems: list[tuple[str, str, str]] | None = None) -> tuple[list[str], int]:
    """(sorted relative POSIX paths of the inputs, number of deploy outputs ignored).

    `exclude` is a folder never descended into (the output folder, when it lies inside the input).
    `problems`, when given, receives (relpath, status, reason) for what cannot be an input: matching
    names that are dangling links, link loops or not regular files (failed), and with `recursive`
    unreadable subfolders (failed) and symbolic links to folders (skipped: not followed).
    """
    patterns = tuple(patterns)
    exclude = exclude.resolve() if exclude is not None else None
    problems = problems if problems is not None else []
    found: list[str] = []
    ignored = 0

    def unreadable(exc: OSError) -> None:
        where = Path(exc.filename) if exc.filename else input_dir
        if where != input_dir:
            problems.append((where.relative_to(input_dir).as_posix() + "/", FAILED,
                             f"cannot read this folder: {exc.strerror}"))

    for folder, dirs, files in os.walk(input_dir, onerror=unreadable):
        here = Path(folder)
        kept = []
        for d in sorted(dirs):
            if not recursive or d.startswith(".") or (exclude is not None and (here / d).resolve() == exclude):
                continue
            if (here / d).is_symlink():  # os.walk does not follow them: say so instead of omitting them
                problems.append(((here / d).relative_to(input_dir).as_posix() + "/", SKIPPED,
                                 "a symbolic link to a folder: not followed"))
                continue
            kept.append(d)
        dirs[:] = kept
        for name in sorted(files):
            rel = (here / name).relative_to(input_dir).as_posix()
            if name.startswith(".") or not _matches(rel, patterns):
                continue
            reason = _not_an_input(here / name)
            if reason is not None:
                problems.append((rel, FAILED if "loop" in reason or "read" in reason else SKIPPED, reason))
                continue
            if _is_deploy_output(here / name):
                ignored += 1
                continue
            found.append(rel)
    problems.sort()
    return sorted(found), ignored


def output_names(relpaths: list[str], fmt: str) -> dict[str, str]:
    """Relative output path of each input, injective even case-insensitively.

    Each input gets the first of these that no other input's output (or output folder) shares,
    compared case-folded: `stem.deploy<suffix>` in the mirrored folder, `name.deploy<suffix>`
    (x.pth and x.pt), then `name.<hash>.deploy<suffix>` with 8 hex digits of the sha256 of the input's
    relative path (X.pth and x.pth, or A/x.pth and a/x.pth). In a clash, the inputs on the earlier
    kind of name move on. The result depends on the set of inputs only, not their order. Raises
    BatchError if the mapping is still not injective (a sha256 prefix collision).
    """

    suffix = SUFFIX[fmt]

    def candidate(rel: str, level: int) -> str:
        p = Path(rel)
        base = p.stem if level == 0 else p.name
        if level >= 2:
            base += "." + hashlib.sha256(rel.encode("utf-8", "surrogateescape")).hexdigest()[:8]
        return (p.parent / f"{base}.deploy{suffix}").as_posix()

    import unicodedata

    def fold(name: str) -> str:  # what case-insensitive, normalising filesystems (APFS, NTFS) compare
        return unicodedata.normalize("NFC", name).casefold()

    rels = sorted(set(relpaths))
    folders = {fold(parent.as_posix()) for rel in rels for parent in Path(rel).parents if parent != Path(".")}
    level = {rel: 0 for rel in rels}
    while True:  # each round raises a level, so this ends (at most 2 rounds per input)
        owners: dict[str, list[str]] = {}
        for rel in rels:
            owners.setdefault(fold(candidate(rel, level[rel])), []).append(rel)
        moved = False
        for key, group in owners.items():
            if len(group) == 1 and key not in folders:
                continue
            # Move the inputs at the lowest level of the clash: an input already on its full name
            # keeps it when the other one can still move.
            low = min(level[rel] for rel in group)
            for rel in group:
                if level[rel] == low and low < 2:
                    level[rel] += 1
                    moved = True
        if not moved:
            break
    out = {rel: candidate(rel, level[rel]) for rel in rels}
    keys = [fold(name) for name in out.values()]
    if len(set(keys)) != len(keys) or folders & set(keys):
        raise BatchError("cannot give every input its own output name", hint="rename inputs that differ only in case")
    return {rel: out[rel] for rel in relpaths}


# --- one conversion (runs in a worker process) -----------------------------------------------------


@dataclass
class Task:
    relpath: str
    input: str
    output: str
    resume: bool = False
    previous: list[Entry] = field(default_factory=list)  # earlier manifest lines that may allow a skip
    problem: tuple[str, str] | None = None  # (status, reason): not an input (a link loop, an unreadable folder)
    out_rel: str = ""  # the output, relative to the output folder (POSIX)


def convert_one(task: Task, spec: ModelSpec, options: ConvertOptions) -> Entry:
    """Convert (or skip) one input; never raises for a bad input: the manifest line says what happened."""
    from reparam_cli.io.checkpoint import check_checkpoint_file, sha256_file
    from reparam_cli.io.safetensors import read_metadata
    from reparam_cli.pipeline.conversion import convert_checkpoint

    start = time.perf_counter()
    entry: Entry = {"input": task.input, "output": task.output, "status": FAILED, "error": None,
                    "max_rel_err": None, "seconds": 0.0, "input_sha256": None, "output_sha256": None,
                    "relpath": task.relpath, "spec": spec.name, "format": options.fmt, "graph": options.graph}
    if task.problem is not None:
        entry.update(status=task.problem[0], error=task.problem[1], output=None,
                     finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        return entry
    output = Path(task.output)
    folder = None
    try:
        check_checkpoint_file(task.input)  # a FIFO or /dev/zero must not reach the hash
        entry["input_sha256"] = sha256_file(task.input)
        folder = _output_folder(task)  # every step below names the output relative to this descriptor
        name = output.name
        present = _regular_at(folder, name)
        candidates = [e for e in task.previous if e.get("input_sha256") == entry["input_sha256"]]
        if task.resume and candidates and present:
            current = _sha256_at(folder, name)
            match = next((e for e in candidates if e.get("output_sha256") == current), None)
            if match is not None:
                entry.update(status=SKIPPED, max_rel_err=match.get("max_rel_err"), output_sha256=current)
                return entry
        if _exists_at(folder, name) and not (options.overwrite or task.resume):
            raise OutputError(f"output {output} already exists",
                              hint="pass --resume to skip unchanged inputs, or --overwrite to replace outputs")
        with pinned_folder(output.parent, folder):
            report = convert_checkpoint(task.input, spec, output, options,
                                        overwrite=options.overwrite or task.resume)
        entry["max_rel_err"] = report.get("max_rel_err")
        # The input may have been rewritten while we read it (a training job still saving): the hash
        # the deploy file records must be the one in the manifest, or resume would trust a stale file.
        written = f"/proc/self/fd/{folder}/{name}" if os.path.isdir(f"/proc/self/fd/{folder}") else output
        source = read_metadata(written).get("source_sha256") if options.fmt == "safetensors" else sha256_file(task.input)
        if source != entry["input_sha256"]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=folder)
            raise ReparamError("the input changed while it was being converted", hint="run again once it is complete")
        entry.update(status=CONVERTED, output_sha256=_sha256_at(folder, name))
    except VerificationFailed as exc:
        entry["max_rel_err"] = exc.report.get("max_rel_err")
        failed = exc.report.get("failed_blocks") or []
        entry["error"] = f"verification failed: {exc}" + (f" (blocks: {', '.join(failed[:5])})" if failed else "")
    except ReparamError as exc:
        entry["error"] = str(exc)
    except OSError as exc:
        entry["error"] = f"cannot read {exc.filename or task.input}: {os_reason(exc)}"
    except MemoryError:
        entry["error"] = "out of memory while converting this file"
    except RecursionError:
        entry["error"] = "this file nests too deeply to be read (Python's recursion limit)"
    except Exception as exc:  # a bug or an odd file must not stop the batch
        entry["error"] = f"unexpected {describe(exc)}"
    finally:
        if folder is not None:
            os.close(folder)
        entry["seconds"] = round(time.perf_counter() - start, 3)
        entry["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return entry


# The output folder, opened once per process: (descriptor, path, (st_dev, st_ino) it must have).
_ROOT: list = []


def _set_output_root(path: str, ident: tuple[int, int] | None = None, fd: int | None = None) -> None:
    """Remember the output folder's descriptor for convert_one: the batch's own (`fd`), or in a worker
    the folder opened by path once, which must be the one the batch opened (`ident`)."""
    if fd is None:
        try:
            fd = open_folder(path)
        except OSError:
            fd = None
        st = os.fstat(fd) if fd is not None else None
        if st is not None and ident is not None and (st.st_dev, st.st_ino) != tuple(ident):
            os.close(fd)
            fd = None
    _ROOT[:] = [fd, path]


def _root_fd(task: Task) -> int:
    if _ROOT and _ROOT[0] is not None and task.out_rel:
        return _ROOT[0]
    raise ReparamError("the output folder was removed or replaced while the batch ran")


def _output_folder(task: Task) -> int:
    """A new descriptor of the folder the output goes to: each folder below the output folder is
    created if missing and opened relative to its parent's descriptor with O_NOFOLLOW, so a symbolic
    link planted in the output folder is refused, never followed."""
    fd = os.dup(_root_fd(task))
    parts = task.out_rel.split("/")[:-1]
    i = 0
    try:
        for i, part in enumerate(parts):
            with contextlib.suppress(FileExistsError):
                os.mkdir(part, dir_fd=fd)
            sub = open_folder(part, follow=False, dir_fd=fd)
            os.close(fd)
            fd = sub
    except OSError as exc:
        os.close(fd)
        where = "/".join(parts[: i + 1])
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise OutputError(f"{where}/ in the output folder is a symbolic link or not a folder: "
                              "reparam does not follow links in its output folder") from None
        raise OutputError(f"cannot create the folder {where}/ in the output folder: {os_reason(exc)}") from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _exists_at(folder: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=folder, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _regular_at(folder: int, name: str) -> bool:
    import stat

    try:
        return stat.S_ISREG(os.stat(name, dir_fd=folder, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        return False


def _sha256_at(folder: int, name: str) -> str:
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0), dir_fd=folder)
    h = hashlib.sha256()
    with open(fd, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux PR_SET_PDEATHSIG), so a
    `kill -9` of the batch stops its workers at once; exit now if the parent is already gone."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def _worker_terminated(signum, frame) -> None:
    """SIGTERM from the batch stopping its workers: remove named temporaries, exit at once."""

    remove_live_temps()
    os._exit(128 + signum)


def _init_worker(threads: int, parent: int | None = None, root: tuple | None = None) -> None:
    if parent is not None:
        die_with_parent(parent)
    if root is not None:
        _set_output_root(*root)
    import torch

    torch.set_num_threads(threads)
    # stdout belongs to the parent's --json report: a print in a user's spec must not land there.
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    # Ctrl-C and a closed terminal reach the whole process group: the parent handles them (and
    # stops the workers with SIGTERM).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _worker_terminated)


# --- the manifest ---------------------------------------------------------------------------------

class Manifest:
    """This run's manifest: a `pending` line per input, then lines appended (and flushed) to a hidden
    partial file as files finish; `close()` writes the manifest whole. Holding an exclusive lock on the
    partial file keeps a second run with the same manifest name (same folder, same shard) from
    interleaving with this one."""

    def __init__(self, output_dir: Path, name: str, dir_fd: int | None = None):
        self.path = output_dir / name
        self.partial = output_dir / f".{name}.partial"
        self.name, self.partial_name = name, f".{name}.partial"
        # Every file of the manifest is named relative to one descriptor of the output folder.
        self.dir_fd = os.dup(dir_fd) if dir_fd is not None else open_folder(output_dir)
        try:
            self._file = self._open_locked()
        except BaseException:
            os.close(self.dir_fd)
            raise
        self.started = False

    def _open_locked(self):
        for _ in range(5):
            try:
                f = _open_regular(self.partial, os.O_RDWR | os.O_CREAT | os.O_APPEND, self.dir_fd)
            except OSError as exc:
                raise BatchError(f"cannot write the manifest {self.partial}: {os_reason(exc)}") from None
            try:
                import fcntl
            except ImportError:  # not POSIX: no lock
                return f
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.close()
                raise BatchError(f"another reparam batch is writing {self.path}",
                                 hint="wait for it, or give this run its own --output-dir or --shard") from None
            # The holder may have renamed the file into place between our open and our lock.
            try:
                if os.stat(self.partial_name, dir_fd=self.dir_fd, follow_symlinks=False).st_ino == os.fstat(f.fileno()).st_ino:
                    return f
            except FileNotFoundError:
                pass
            f.close()
        raise BatchError(f"cannot lock {self.partial}")

    def own_entries(self) -> dict[str, Entry]:
        """The latest usable line per input in this manifest and its partial file (an earlier run's)."""
        entries: dict[str, Entry] = {}
        for path in (self.path, self.partial):
            for e in _manifest_lines(path, [], self.dir_fd):
                if _usable(e):
                    entries[e["relpath"]] = e
        return entries

    def start(self, tasks: Iterable[Task] = ()) -> None:
        """Forget what an interrupted earlier run left in the partial file (read it first, if resuming),
        and record every input this run may write an output for."""
        self._file.seek(0)
        self._file.truncate()
        for task in tasks:
            if task.problem is None:
                self.write({"relpath": task.relpath, "input": task.input, "output": task.output, "status": PENDING})
        self.started = True

    def write(self, entry: Entry) -> None:
        self._file.write(json.dumps(storable(entry), sort_keys=False) + "\n")
        self._file.flush()

    def close(self, entries: list[Entry] | None = None, earlier: dict[str, Entry] | None = None,
              planned: Iterable[str] = ()) -> None:
        """Write the manifest: this run's `entries`, plus for each `planned` input this run did not
        finish its `earlier` line, and under `previous` of a failed entry its earlier usable line.
        A run stopped before `start` leaves the manifest (and an earlier run's partial file) as it was."""
        try:
            if self.started:
                self._write_final(entries or [], earlier or {}, planned)
            elif os.fstat(self._file.fileno()).st_size == 0:  # stopped before starting: touch nothing
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.partial_name, dir_fd=self.dir_fd)
        finally:
            self._file.close()
            os.close(self.dir_fd)

    def _write_final(self, entries: list[Entry], earlier: dict[str, Entry], planned: Iterable[str]) -> None:
        done = {e["relpath"] for e in entries}
        lines = []
        for e in entries:
            before = earlier.get(e["relpath"])
            if e["status"] == FAILED and before is not None:
                e = {**e, "previous": before.get("previous", before) if before["status"] == FAILED else before}
            lines.append(e)
        lines += [earlier[rel] for rel in planned if rel not in done and rel in earlier]
        with pinned_folder(self.path.parent, self.dir_fd), atomic_output(self.path, overwrite=True) as tmp, \
                open(tmp, "w", encoding="utf-8") as f:
            for e in lines:
                f.write(json.dumps(storable(e), sort_keys=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.partial_name, dir_fd=self.dir_fd)


def _usable(e: Any) -> bool:
    """A manifest line that records an output --resume may keep (or holds one under `previous`)."""
    if isinstance(e, dict) and isinstance(e.get("previous"), dict):
        return _usable(e["previous"])
    return (isinstance(e, dict) and e.get("status") in (CONVERTED, SKIPPED) and isinstance(e.get("relpath"), str)
            and isinstance(e.get("input_sha256"), str) and isinstance(e.get("output_sha256"), str)
            and (e.get("spec") is None or isinstance(e.get("spec"), str))
            and (e.get("format") is None or isinstance(e.get("format"), str)))


PATH_FIELDS = ("relpath", "input", "output")


def printable(text: Any) -> Any:
    """`text` with what is not valid UTF-8 (a file name's undecodable bytes, kept by Python as
    surrogate escapes) shown as `\\xNN`: safe for a terminal, jq or any strict UTF-8 reader."""
    if not isinstance(text, str):
        return text
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        raw = os.fsencode(text)  # surrogate escapes give the name's bytes back
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "backslashreplace")
    return raw.decode("utf-8", "backslashreplace")


def storable(entry: Entry) -> Entry:
    """The manifest line of `entry`: each path field printable, and where that is not the exact name
    (bytes that are not UTF-8), `<field>_bytes` beside it: the base64 of the exact bytes
    (`os.fsencode`), which `restored` (and so --resume) uses."""
    out = dict(entry)
    for key in PATH_FIELDS:
        value = entry.get(key)
        shown = printable(value)
        if shown != value:
            out[key] = shown
            with contextlib.suppress(UnicodeEncodeError):
                out[key + "_bytes"] = base64.b64encode(os.fsencode(value)).decode("ascii")
    if isinstance(entry.get("error"), str):
        out["error"] = printable(entry["error"])
    if isinstance(entry.get("previous"), dict):
        out["previous"] = storable(entry["previous"])
    return out


def restored(line: Entry) -> Entry:
    """The entry a manifest line records: path fields from their exact bytes where given (a
    `<field>_bytes` that is not valid base64 makes the line unusable for --resume)."""
    out = dict(line)
    for key in PATH_FIELDS:
        raw = out.pop(key + "_bytes", None)
        if raw is None:
            continue
        try:
            out[key] = os.fsdecode(base64.b64decode(raw, validate=True)) if isinstance(raw, str) else None
        except ValueError:
            out[key] = None
    if isinstance(out.get("previous"), dict):
        out["previous"] = restored(out["previous"])
    return out


def _open_regular(path: Path, flags: int, dir_fd: int | None = None):
    """A text file object on the regular file `path` (opened with `flags`), never through a symlink
    (O_NOFOLLOW: a link planted as the manifest or its partial file is refused, not followed) and
    never a FIFO or device (O_NONBLOCK, then checked). With `dir_fd`, the file `path.name` in that folder."""
    import stat

    try:
        fd = os.open(path.name if dir_fd is not None else path,
                     flags | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0), 0o666, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise BatchError(f"{path} is a symbolic link: reparam does not follow links in its output folder",
                             hint="remove it") from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise BatchError(f"{path} is not a regular file", hint="remove it")
        os.set_blocking(fd, True)
        return open(fd, "a+" if flags & os.O_APPEND else "r", encoding="utf-8", closefd=True)
    except BaseException:
        os.close(fd)
        raise


def _manifest_lines(path: Path, junk: list[str], dir_fd: int | None = None) -> list[Any]:
    """The parsed lines of one manifest file; a line that is not a JSON object is counted in `junk`.
    A symlink, FIFO or device in its place is not read."""
    try:
        with _open_regular(path, os.O_RDONLY, dir_fd) as f:
            data = f.buffer.read()
    except (OSError, BatchError):
        return []
    lines = []
    for raw in data.splitlines():
        if not raw.strip():
            continue
        try:
            e = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            junk.append(path.name)
            continue
        if not isinstance(e, dict):
            junk.append(path.name)
            continue
        lines.append(restored(e))
    return lines


def read_manifests(output_dir: Path, notes: list[str] | None = None, dir_fd: int | None = None) -> dict[str, list[Entry]]:
    """Every line of every manifest in `output_dir` (partial ones of interrupted runs included) that
    records a usable output, by input relative path. Lines that are not JSON objects (a torn last
    line, binary junk) are ignored, and so are lines with fields of the wrong type; `notes`, when
    given, gets one sentence per file that had any."""
    entries: dict[str, list[Entry]] = {}
    try:
        names = os.listdir(dir_fd if dir_fd is not None else output_dir)
    except OSError:
        names = []
    files = [output_dir / n for n in sorted(fnmatch.filter(names, "manifest*.jsonl"))
             + sorted(fnmatch.filter(names, ".manifest*.jsonl.partial"))]
    for path in files:
        junk: list[str] = []
        lines = _manifest_lines(path, junk, dir_fd)
        wrong = 0
        for e in lines:
            if e.get("status") == PENDING:
                continue
            if not _usable(e):
                wrong += e.get("status") in (CONVERTED, SKIPPED)  # claims an output but cannot be trusted
                continue
            e = e["previous"] if e.get("status") not in (CONVERTED, SKIPPED) else e
            entries.setdefault(e["relpath"], []).append(e)
        if (junk or wrong) and notes is not None:
            notes.append(f"{path.name}: ignored {len(junk) + wrong} line(s) that are not valid manifest entries")
    return entries


# --- the run --------------------------------------------------------------------------------------

@dataclass
class BatchPlan:
    input_dir: Path
    output_dir: Path
    tasks: list[Task]
    found: int  # inputs in the folder, all shards together
    ignored: int  # deploy outputs seen and not taken as inputs
    shard: Shard


def plan(input_dir: Path, output_dir: Path, spec: ModelSpec, options: ConvertOptions, patterns: Iterable[str] = DEFAULT_PATTERNS,
         recursive: bool = False, shard: Shard = Shard(), resume: bool = False,
         previous: dict[str, list[Entry]] | None = None) -> BatchPlan:
    """The inputs this run (shard) converts, with their outputs."""
    if not input_dir.is_dir():
        raise BatchError(f"input folder not found: {input_dir}" if not input_dir.exists()
                         else f"not a folder: {input_dir}")
    if output_dir.exists() and not output_dir.is_dir():
        raise BatchError(f"--output-dir {output_dir} is a file, not a folder")
    patterns = tuple(patterns) or DEFAULT_PATTERNS
    inside = output_dir.resolve() != input_dir.resolve() and output_dir.resolve().is_relative_to(input_dir.resolve())
    problems: list[tuple[str, str, str]] = []
    relpaths, ignored = discover(input_dir, patterns, recursive, exclude=output_dir if inside else None,
                                 problems=problems)
    if not relpaths and not problems:
        raise BatchError(f"no checkpoints matching {' '.join(patterns)} in {input_dir}"
                         + ("" if recursive else " (top level only)"),
                         hint=None if recursive else "pass --recursive to search subfolders")
    names = output_names(relpaths, options.fmt)
    previous = previous or {}
    # (lines written before --no-graph existed were converted with the graph pass)
    same = lambda e: (e.get("spec") == spec.name and e.get("format") == options.fmt  # noqa: E731
                      and e.get("graph", True) == options.graph)
    tasks = [Task(rel, str(input_dir / rel), str(output_dir / names[rel]), resume,
                  [e for e in previous.get(rel, []) if same(e)], out_rel=names[rel])
             for rel in relpaths if shard.takes(rel)]
    tasks += [Task(rel, str(input_dir / rel), "", problem=(status, reason))
              for rel, status, reason in problems if shard.takes(rel)]
    return BatchPlan(input_dir, output_dir, tasks, len(relpaths) + len(problems), ignored, shard)


def _results(tasks: list[Task], spec: ModelSpec, options: ConvertOptions, jobs: int,
             root: tuple | None = None) -> Iterator[Entry]:
    """Manifest lines as conversions finish: in this process for one job, else in spawned workers."""
    for task in [t for t in tasks if t.problem is not None]:  # nothing to convert: no worker needed
        yield convert_one(task, spec, options)
    tasks = [t for t in tasks if t.problem is None]
    if jobs <= 1 or len(tasks) <= 1:
        for task in tasks:
            yield convert_one(task, spec, options)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    jobs = min(jobs, len(tasks))
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker, initargs=(max(1, cpu_count() // jobs), os.getpid(), root))
    futures = {pool.submit(convert_one, task, spec, options): task for task in tasks}
    try:
        for future in as_completed(futures):
            try:
                yield future.result()
            except BrokenProcessPool:
                # A worker died (killed, out of memory): every unfinished file fails; --resume retries them.
                task = futures[future]
                yield {"input": task.input, "output": task.output, "status": FAILED, "relpath": task.relpath,
                       "error": "a worker process died (out of memory, or killed?)", "max_rel_err": None,
                       "seconds": None, "input_sha256": None, "output_sha256": None, "spec": spec.name,
                       "format": options.fmt, "graph": options.graph}
    except BaseException:
        for process in list(getattr(pool, "_processes", {}).values()):  # stop conversions now, not later
            with contextlib.suppress(Exception):
                process.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def run_batch(input_dir: str | Path, output_dir: str | Path, spec: ModelSpec, options: ConvertOptions, *,
              patterns: Iterable[str] = DEFAULT_PATTERNS, recursive: bool = False, jobs: int = 1,
              resume: bool = False, shard: Shard = Shard(),
              on_start: Callable[[BatchPlan], None] = lambda plan: None,
              on_result: Callable[[Entry], None] = lambda entry: None) -> dict:
    """Convert a folder. Returns the summary (`ok` is False when any file failed); raises BatchError
    when the batch cannot start, Interrupted / KeyboardInterrupt (after closing the manifest) when
    stopped by a signal."""
    from reparam_cli.pipeline.stdio import stdout_to_stderr

    if options.fmt not in FORMATS:
        raise BatchError(f"unknown format {options.fmt!r}", hint=f"choose one of {', '.join(FORMATS)}")
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    plan(input_dir, output_dir, spec, options, patterns, recursive, shard)  # usage errors before touching anything
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        root = open_folder(output_dir)  # the folder the user named, opened once: a link they named is followed
    except OSError as exc:
        raise BatchError(f"cannot use --output-dir {output_dir}: {os_reason(exc)}") from None
    try:
        st = os.fstat(root)
        _set_output_root(str(output_dir), fd=root)
        manifest = Manifest(output_dir, shard.manifest_name, dir_fd=root)
        notes: list[str] = []
        counts = {CONVERTED: 0, SKIPPED: 0, FAILED: 0}
        entries: list[Entry] = []
        earlier: dict[str, Entry] = {}
        todo = None
        start = time.perf_counter()
        try:
            with interrupts_as_exceptions():  # SIGTERM/SIGHUP like Ctrl-C: the manifest is closed
                earlier = manifest.own_entries()
                previous = read_manifests(output_dir, notes, dir_fd=root) if resume else {}
                todo = plan(input_dir, output_dir, spec, options, patterns, recursive, shard, resume, previous)
                jobs = jobs if jobs > 0 else cpu_count()
                manifest.start(todo.tasks)
                on_start(todo)
                with stdout_to_stderr():  # stdout is kept for the --json report
                    for entry in _results(todo.tasks, spec, options, jobs, (str(output_dir), (st.st_dev, st.st_ino))):
                        manifest.write(entry)
                        entries.append(entry)
                        counts[entry["status"]] += 1
                        on_result(entry)
        finally:
            manifest.close(entries, earlier, [t.relpath for t in todo.tasks] if todo else ())
    finally:
        _ROOT[:] = []
        os.close(root)
    entries.sort(key=lambda e: e["relpath"])
    report = {
        "ok": counts[FAILED] == 0, "input_dir": printable(str(input_dir)), "output_dir": printable(str(output_dir)),
        "manifest": printable(str(manifest.path)), "spec": spec.name, "format": options.fmt,
        "shard": f"{shard.index}/{shard.count}", "jobs": jobs, "found": todo.found, "inputs": len(todo.tasks),
        "ignored_deploy_files": todo.ignored, **counts, "seconds": round(time.perf_counter() - start, 3),
        "files": [storable(e) for e in entries],
    }
    if notes:
        report["notes"] = notes
    return report


# --- terminal output (stderr) ---------------------------------------------------------------------

class Reporter:
    """Per-file status lines and one progress bar (on a terminal) on stderr."""

    def __init__(self, console):
        self.console = console
        self.progress = None
        self.task = None
        self.counts = {CONVERTED: 0, SKIPPED: 0, FAILED: 0}

    def start(self, todo: BatchPlan) -> None:
        shard = f" (shard {todo.shard.index}/{todo.shard.count} of {todo.found})" if todo.shard.count > 1 else ""
        self.console.print(f"converting {len(todo.tasks)} checkpoint(s) from {printable(str(todo.input_dir))}{shard}")
        if self.console.is_terminal and todo.tasks:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), console=self.console, transient=True)
            self.progress.start()
            self.task = self.progress.add_task(self._description(), total=len(todo.tasks))

    def _description(self) -> str:
        c = self.counts
        failed = f" [red]{c[FAILED]} failed[/]" if c[FAILED] else ""
        return f"[green]{c[CONVERTED]} converted[/] {c[SKIPPED]} skipped{failed}"

    def result(self, entry: Entry) -> None:
        self.counts[entry["status"]] += 1
        status = entry["status"]
        if status == CONVERTED:
            err = entry.get("max_rel_err")
            detail = f"{entry['seconds']:.1f}s" + (f", max rel err {err:.2g}" if isinstance(err, float) else "")
            line = f"[green]converted[/] {printable(entry['relpath'])} ({detail})"
        elif status == SKIPPED:
            line = f"[dim]skipped[/]   {printable(entry['relpath'])} ({printable(entry.get('error') or 'unchanged')})"
        else:
            line = f"[red]failed[/]    {printable(entry['relpath'])}: {printable(entry['error'])}"
        self.console.print(line, soft_wrap=True)  # one line per file, greppable in job logs
        if self.progress is not None:
            self.progress.update(self.task, advance=1, description=self._description())

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def summary(self, report: dict) -> None:
        c = report
        colour = "green" if report["ok"] else "red"
        self.console.print(f"[{colour}]{c[CONVERTED]} converted, {c[SKIPPED]} skipped, {c[FAILED]} failed[/] "
                           f"in {report['seconds']:.1f}s; manifest: {report['manifest']}")
        if report["ignored_deploy_files"]:
            self.console.print(f"[dim]({report['ignored_deploy_files']} deploy file(s) in the input folder ignored)[/]")
        for note in report.get("notes", []):
            self.console.print(f"[dim]note: {note}[/]", soft_wrap=True)

