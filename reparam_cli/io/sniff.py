"""What a file is, from its first bytes (and its suffix where that decides): a training checkpoint
(safetensors or a torch pickle), or a deploy file (safetensors, TorchScript, pt2, ONNX, or a
plain state dict of a fused model). Torch-free: nothing is loaded here."""

from __future__ import annotations

import zipfile
from pathlib import Path

from reparam_cli.errors import CheckpointError


def is_safetensors_head(head: bytes) -> bool:
    """Whether a file's first bytes (9 or more) are safetensors': an 8-byte little-endian header
    length, then a JSON header starting with '{'."""
    return len(head) >= 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") < (1 << 30)


def checkpoint_kind(head: bytes) -> str | None:
    """'safetensors' or 'torch' from a file's first bytes (16 suffice), None for anything else.

    safetensors: an 8-byte little-endian header length, then the JSON header ('{'). torch: a zip
    archive ('PK\\x03\\x04', torch >= 1.6) or a legacy pickle (protocol 2-5: 0x80 and the protocol).
    """
    if is_safetensors_head(head):
        return "safetensors"
    if head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
        return "torch"
    return None


def looks_like_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        return is_safetensors_head(f.read(9))


def sniff_deploy_format(path: Path) -> str | None:
    """'torchscript', 'pt2' or 'onnx' when the file is one of those deploy formats, else None."""
    if path.suffix == ".onnx":
        return "onnx"
    if zipfile.is_zipfile(path):
        try:
            names = zipfile.ZipFile(path).namelist()
        except (zipfile.BadZipFile, OSError):
            return None
        if any(n.endswith("/archive_format") for n in names):
            return "pt2"
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            return "torchscript"
    return None


def sniff_format(head: bytes) -> str:
    """'safetensors' or 'torch', from a file's first bytes (16 of them; see `checkpoint.checkpoint_kind`).
    Raises CheckpointError for anything else, so /dev/zero piped in stops at its first bytes."""
    kind = checkpoint_kind(head)
    if kind is not None:
        return kind

    raise CheckpointError("the input is neither a safetensors file nor a torch checkpoint"
                          if head else "the input is empty")


def deploy_format_of(path: str | Path) -> str:
    """The deploy format of a file, from its suffix and its contents: 'safetensors', 'onnx', 'pt2',
    'torchscript', or 'state_dict' (a plain torch.save pickle: a state dict in a reference layout)."""

    path = Path(path)
    # By content too: a file being written is checked under a name without suffix (/proc/self/fd/N).
    if path.suffix == ".safetensors" or (path.is_file() and looks_like_safetensors(path)):
        return "safetensors"
    if path.suffix == ".onnx":
        return "onnx"
    found = sniff_deploy_format(path)
    if found:
        return found
    if path.suffix == ".pt2":
        return "pt2"
    return "state_dict" if is_torch_pickle(path) else "torchscript"


def is_torch_pickle(path: Path) -> bool:
    """A torch.save file (zip or legacy pickle) that is not TorchScript / pt2 (checked before)."""

    try:
        with open(path, "rb") as f:
            head = f.read(16)
        return sniff_format(head) == "torch"
    except (OSError, CheckpointError):
        return False
