"""`reparam batch`: convert every checkpoint in a folder, in parallel, resumably, shardably.

    run_batch(input_dir, output_dir, options)   -> summary dict; one manifest line per input

* Inputs: files matching the patterns (default *.pth *.pt *.ckpt *.safetensors *.bin), at the top
  of INPUT_DIR or (recursive) below it; hidden files and folders, the output folder, and deploy
  files (`*.deploy.*`, or safetensors carrying reparam's deploy metadata) are never inputs.
* Outputs mirror the layout: INPUT_DIR/a/b/x.pth -> OUTPUT_DIR/a/b/x.deploy.safetensors. Two
  inputs in one folder with the same stem (x.pth, x.pt) keep their suffix instead (x.pth.deploy...).
* Each conversion runs `pipeline.convert_checkpoint`, in this process for one job, else in a pool of
  spawned processes with torch.set_num_threads(cores // jobs) each. A failure is recorded and the
  batch goes on.
* The manifest (`manifest.jsonl`, or `manifest.shard-K-of-N.jsonl` for a shard) has one JSON line
  per input. Lines are appended to a hidden `.NAME.partial` as files finish (flushed, so a crash or
  a kill loses nothing) and renamed into place at the end; an exclusive lock keeps two runs from
  writing the same manifest. `--resume` reads every manifest in OUTPUT_DIR, partial ones included.
* Shard K/N takes the inputs whose relative path hashes (sha256) to K mod N: stable per file, so
  the N shards of a job array partition the folder exactly even if they list it at different times,
  and they write disjoint outputs and their own manifests.
"""

from __future__ import annotations

import contextlib
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

from .errors import OutputError, ReparamError, VerificationFailed

DEFAULT_PATTERNS = ("*.pth", "*.pt", "*.ckpt", "*.safetensors", "*.bin")
MANIFEST = "manifest.jsonl"
CONVERTED, FAILED, SKIPPED = "converted", "failed", "skipped"

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
        digest = hashlib.sha256(relpath.encode("utf-8")).digest()
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
    except (OSError, ValueError):
        return False  # unreadable: let the conversion report it
    from .metadata import decode_metadata, is_deploy_metadata

    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return isinstance(meta, dict) and is_deploy_metadata(decode_metadata(meta))


def _matches(relpath: str, patterns: Iterable[str]) -> bool:
    """A pattern with a '/' matches the relative path, one without matches the file name."""
    name = relpath.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatchcase(relpath if "/" in p else name, p) for p in patterns)


def discover(input_dir: Path, patterns: Iterable[str] = DEFAULT_PATTERNS, recursive: bool = False,
             exclude: Path | None = None) -> tuple[list[str], int]:
    """(sorted relative POSIX paths of the inputs, number of deploy outputs ignored).

    `exclude` is a folder never descended into (the output folder, when it lies inside the input).
    """
    patterns = tuple(patterns)
    exclude = exclude.resolve() if exclude is not None else None
    found: list[str] = []
    ignored = 0
    for folder, dirs, files in os.walk(input_dir):
        here = Path(folder)
        dirs[:] = sorted(d for d in dirs if recursive and not d.startswith(".")
                         and (exclude is None or (here / d).resolve() != exclude))
        for name in sorted(files):
            rel = (here / name).relative_to(input_dir).as_posix()
            if name.startswith(".") or not _matches(rel, patterns) or not (here / name).is_file():
                continue
            if _is_deploy_output(here / name):
                ignored += 1
                continue
            found.append(rel)
    return sorted(found), ignored


def output_names(relpaths: list[str], fmt: str) -> dict[str, str]:
    """Relative output path of each input: `stem.deploy<suffix>` in the mirrored folder, or
    `name.deploy<suffix>` where two inputs of one folder share a stem (x.pth and x.pt)."""
    from .export import SUFFIX

    suffix = SUFFIX[fmt]
    stems: dict[tuple[str, str], int] = {}
    for rel in relpaths:
        p = Path(rel)
        stems[(p.parent.as_posix(), p.stem)] = stems.get((p.parent.as_posix(), p.stem), 0) + 1
    out = {}
    for rel in relpaths:
        p = Path(rel)
        base = p.name if stems[(p.parent.as_posix(), p.stem)] > 1 else p.stem
        out[rel] = (p.parent / f"{base}.deploy{suffix}").as_posix()
    return out


# --- one conversion (runs in a worker process) -----------------------------------------------------

@dataclass
class ConvertOptions:
    """What `convert_checkpoint` gets for every file (picklable: sent to worker processes)."""

    spec: Any  # a ModelSpec (resolved once, in the parent, so a bad spec fails before anything runs)
    fmt: str = "safetensors"
    verify_output: bool = True
    verify_options: Any = None  # pipeline.VerifyOptions
    overwrite: bool = False
    trust_pickle: bool = False
    dynamic_shapes: str = "auto"  # pt2/ONNX dynamic dims (export.DYNAMIC_SHAPES)


@dataclass
class Task:
    relpath: str
    input: str
    output: str
    resume: bool = False
    previous: list[Entry] = field(default_factory=list)  # earlier manifest lines that may allow a skip


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def convert_one(task: Task, options: ConvertOptions) -> Entry:
    """Convert (or skip) one input; never raises for a bad input: the manifest line says what happened."""
    from .checkpoint import sha256_file
    from .deploy import read_metadata
    from .pipeline import convert_checkpoint

    start = time.perf_counter()
    entry: Entry = {"input": task.input, "output": task.output, "status": FAILED, "error": None,
                    "max_rel_err": None, "seconds": 0.0, "input_sha256": None, "output_sha256": None,
                    "relpath": task.relpath, "spec": options.spec.name, "format": options.fmt}
    output = Path(task.output)
    try:
        entry["input_sha256"] = sha256_file(task.input)
        candidates = [e for e in task.previous if e.get("input_sha256") == entry["input_sha256"]]
        if task.resume and candidates and output.is_file():
            current = sha256_file(output)
            match = next((e for e in candidates if e.get("output_sha256") == current), None)
            if match is not None:
                entry.update(status=SKIPPED, max_rel_err=match.get("max_rel_err"), output_sha256=current)
                return entry
        if output.exists() and not (options.overwrite or task.resume):
            raise OutputError(f"output {output} already exists",
                              hint="pass --resume to skip unchanged inputs, or --overwrite to replace outputs")
        output.parent.mkdir(parents=True, exist_ok=True)
        report = convert_checkpoint(task.input, options.spec, output, fmt=options.fmt,
                                    verify_output=options.verify_output, verify_options=options.verify_options,
                                    overwrite=options.overwrite or task.resume, trust_pickle=options.trust_pickle,
                                    dynamic_shapes=options.dynamic_shapes)
        entry["max_rel_err"] = report.get("max_rel_err")
        # The input may have been rewritten while we read it (a training job still saving): the hash
        # the deploy file records must be the one in the manifest, or resume would trust a stale file.
        source = read_metadata(output).get("source_sha256") if options.fmt == "safetensors" else sha256_file(task.input)
        if source != entry["input_sha256"]:
            output.unlink(missing_ok=True)
            raise ReparamError("the input changed while it was being converted", hint="run again once it is complete")
        entry.update(status=CONVERTED, output_sha256=sha256_file(output))
    except VerificationFailed as exc:
        entry["max_rel_err"] = exc.report.get("max_rel_err")
        failed = exc.report.get("failed_blocks") or []
        entry["error"] = f"verification failed: {exc}" + (f" (blocks: {', '.join(failed[:5])})" if failed else "")
    except ReparamError as exc:
        entry["error"] = str(exc)
    except Exception as exc:  # a bug or an odd file must not stop the batch
        entry["error"] = f"unexpected {_first_line(exc)}"
    finally:
        entry["seconds"] = round(time.perf_counter() - start, 3)
        entry["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return entry


def cpu_count() -> int:
    """CPU cores this process may use (the affinity mask under Slurm/cgroups, not the whole machine)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    # stdout belongs to the parent's --json report: a print in a user's spec must not land there.
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    # Ctrl-C reaches the whole process group: the parent handles it (and stops the workers).
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# --- the manifest ---------------------------------------------------------------------------------

class Manifest:
    """This run's manifest: lines appended (and flushed) to a hidden partial file as files finish,
    renamed into place by `close()`. Holding an exclusive lock on the partial file keeps a second run
    with the same manifest name (same folder, same shard) from interleaving with this one."""

    def __init__(self, output_dir: Path, name: str):
        self.path = output_dir / name
        self.partial = output_dir / f".{name}.partial"
        self._file = self._open_locked()

    def _open_locked(self):
        for _ in range(5):
            f = open(self.partial, "a+", encoding="utf-8")
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
                if os.stat(self.partial).st_ino == os.fstat(f.fileno()).st_ino:
                    return f
            except FileNotFoundError:
                pass
            f.close()
        raise BatchError(f"cannot lock {self.partial}")

    def start(self) -> None:
        """Forget what an interrupted earlier run left in the partial file (read it first, if resuming)."""
        self._file.seek(0)
        self._file.truncate()

    def write(self, entry: Entry) -> None:
        self._file.write(json.dumps(entry, sort_keys=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        os.replace(self.partial, self.path)
        self._file.close()


def read_manifests(output_dir: Path) -> dict[str, list[Entry]]:
    """Every line of every manifest in `output_dir` (partial ones of interrupted runs included) that
    records a usable output, by input relative path. Torn or foreign lines are ignored."""
    entries: dict[str, list[Entry]] = {}
    files = sorted(output_dir.glob("manifest*.jsonl")) + sorted(output_dir.glob(".manifest*.jsonl.partial"))
    for path in files:
        with contextlib.suppress(OSError), open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    e = json.loads(line)
                except ValueError:
                    continue  # the last line of a run still writing
                if (isinstance(e, dict) and e.get("status") in (CONVERTED, SKIPPED) and e.get("relpath")
                        and e.get("input_sha256") and e.get("output_sha256")):
                    entries.setdefault(e["relpath"], []).append(e)
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


def plan(input_dir: Path, output_dir: Path, options: ConvertOptions, patterns: Iterable[str] = DEFAULT_PATTERNS,
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
    relpaths, ignored = discover(input_dir, patterns, recursive, exclude=output_dir if inside else None)
    if not relpaths:
        raise BatchError(f"no checkpoints matching {' '.join(patterns)} in {input_dir}"
                         + ("" if recursive else " (top level only)"),
                         hint=None if recursive else "pass --recursive to search subfolders")
    names = output_names(relpaths, options.fmt)
    previous = previous or {}
    same = lambda e: e.get("spec") == options.spec.name and e.get("format") == options.fmt  # noqa: E731
    tasks = [Task(rel, str(input_dir / rel), str(output_dir / names[rel]), resume,
                  [e for e in previous.get(rel, []) if same(e)])
             for rel in relpaths if shard.takes(rel)]
    return BatchPlan(input_dir, output_dir, tasks, len(relpaths), ignored, shard)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """A job scheduler stops jobs with SIGTERM: treat it like Ctrl-C so the manifest is closed."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _results(tasks: list[Task], options: ConvertOptions, jobs: int) -> Iterator[Entry]:
    """Manifest lines as conversions finish: in this process for one job, else in spawned workers."""
    if jobs <= 1 or len(tasks) <= 1:
        for task in tasks:
            yield convert_one(task, options)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    jobs = min(jobs, len(tasks))
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker, initargs=(max(1, cpu_count() // jobs),))
    futures = {pool.submit(convert_one, task, options): task for task in tasks}
    try:
        for future in as_completed(futures):
            try:
                yield future.result()
            except BrokenProcessPool:
                # A worker died (killed, out of memory): every unfinished file fails; --resume retries them.
                task = futures[future]
                yield {"input": task.input, "output": task.output, "status": FAILED, "relpath": task.relpath,
                       "error": "a worker process died (out of memory, or killed?)", "max_rel_err": None,
                       "seconds": None, "input_sha256": None, "output_sha256": None, "spec": options.spec.name,
                       "format": options.fmt}
    except BaseException:
        for process in list(getattr(pool, "_processes", {}).values()):  # stop conversions now, not later
            with contextlib.suppress(Exception):
                process.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def run_batch(input_dir: str | Path, output_dir: str | Path, options: ConvertOptions, *,
              patterns: Iterable[str] = DEFAULT_PATTERNS, recursive: bool = False, jobs: int = 1,
              resume: bool = False, shard: Shard = Shard(),
              on_start: Callable[[BatchPlan], None] = lambda plan: None,
              on_result: Callable[[Entry], None] = lambda entry: None) -> dict:
    """Convert a folder. Returns the summary (`ok` is False when any file failed); raises BatchError
    when the batch cannot start, KeyboardInterrupt (after closing the manifest) when stopped."""
    from .export import FORMATS
    from .pipes import stdout_to_stderr

    if options.fmt not in FORMATS:
        raise BatchError(f"unknown format {options.fmt!r}", hint=f"choose one of {', '.join(FORMATS)}")
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    plan(input_dir, output_dir, options, patterns, recursive, shard)  # usage errors before touching anything
    output_dir.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(output_dir, shard.manifest_name)
    previous = read_manifests(output_dir) if resume else {}
    manifest.start()
    todo = plan(input_dir, output_dir, options, patterns, recursive, shard, resume, previous)
    jobs = jobs if jobs > 0 else cpu_count()
    counts = {CONVERTED: 0, SKIPPED: 0, FAILED: 0}
    entries: list[Entry] = []
    start = time.perf_counter()
    on_start(todo)
    try:
        with _sigterm_as_interrupt(), stdout_to_stderr():  # stdout is kept for the --json report
            for entry in _results(todo.tasks, options, jobs):
                manifest.write(entry)
                entries.append(entry)
                counts[entry["status"]] += 1
                on_result(entry)
    finally:
        manifest.close()
    entries.sort(key=lambda e: e["relpath"])
    return {
        "ok": counts[FAILED] == 0, "input_dir": str(input_dir), "output_dir": str(output_dir),
        "manifest": str(manifest.path), "spec": options.spec.name, "format": options.fmt,
        "shard": f"{shard.index}/{shard.count}", "jobs": jobs, "found": todo.found, "inputs": len(todo.tasks),
        "ignored_deploy_files": todo.ignored, **counts, "seconds": round(time.perf_counter() - start, 3),
        "files": entries,
    }


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
        self.console.print(f"converting {len(todo.tasks)} checkpoint(s) from {todo.input_dir}{shard}")
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
            line = f"[green]converted[/] {entry['relpath']} ({detail})"
        elif status == SKIPPED:
            line = f"[dim]skipped[/]   {entry['relpath']} (unchanged)"
        else:
            line = f"[red]failed[/]    {entry['relpath']}: {entry['error']}"
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

