"""Reading checkpoint files as untrusted input: tensors and JSON, never an unrestricted unpickler.

* Nested state (an optimizer's state dict) is split into its tensors (stored as safetensors or in a
  DCP checkpoint) and a JSON tree of everything else, where a tensor is ``{"__tensor__": key}`` and a
  tuple ``{"__tuple__": [...]}``: :func:`split_tensors` / :func:`join_tensors`.
* :class:`SafeFileSystemReader` is DCP's ``FileSystemReader`` whose ``.metadata`` is read by an
  unpickler that only builds the classes on :data:`METADATA_ALLOWED` (DCP's own metadata dataclasses,
  ``torch.Size``, dtypes, paths); anything else (``os.system``, ``builtins.eval``...) is refused.
* :class:`SafeLoadPlanner` is DCP's ``DefaultLoadPlanner`` whose non-tensor items are read with
  ``torch.load(weights_only=True)`` (torch's own allow-list of tensors and plain containers) instead
  of ``weights_only=False``. parallelnn writes no such items; a crafted one is refused.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import torch

TENSOR, TUPLE, ITEMS = "__tensor__", "__tuple__", "__items__"


class UnsafeCheckpoint(Exception):
    """A checkpoint file asked for something a checkpoint never needs (code, an unknown class)."""


# -- tensors apart from the rest --------------------------------------------------------------------

def split_tensors(obj: Any, prefix: str = "", tensors: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
    """``obj`` as a JSON-able tree with its tensors replaced by references, and those tensors."""
    tensors = {} if tensors is None else tensors

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            key = path or "."
            tensors[key] = value
            return {TENSOR: key}
        if isinstance(value, dict):
            if all(isinstance(k, str) for k in value):
                return {k: walk(v, f"{path}.{k}" if path else k) for k, v in value.items()}
            return {ITEMS: [[k, walk(v, f"{path}.{k}" if path else str(k))] for k, v in value.items()]}
        if isinstance(value, tuple):
            return {TUPLE: [walk(v, f"{path}.{i}") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(value)]
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"cannot store {type(value).__name__} at {path} in a checkpoint")

    return walk(obj, prefix), tensors


def join_tensors(tree: Any, tensors: dict[str, Any]) -> Any:
    """Inverse of :func:`split_tensors`; a reference to a tensor that is not there is an error."""
    if isinstance(tree, dict):
        if set(tree) == {TENSOR}:
            key = tree[TENSOR]
            if key not in tensors:
                raise KeyError(f"tensor {key} is missing")
            return tensors[key]
        if set(tree) == {TUPLE}:
            return tuple(join_tensors(v, tensors) for v in tree[TUPLE])
        if set(tree) == {ITEMS}:
            return {k: join_tensors(v, tensors) for k, v in tree[ITEMS]}
        return {k: join_tensors(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [join_tensors(v, tensors) for v in tree]
    return tree


# -- DCP with restricted deserialisation ------------------------------------------------------------

def _allowed() -> dict[tuple[str, str], Any]:
    import pathlib

    import torch.distributed.checkpoint.filesystem as fs
    import torch.distributed.checkpoint.metadata as md
    import torch.serialization as ser

    allowed: dict[tuple[str, str], Any] = {}
    for name in ("Metadata", "MetadataIndex", "TensorProperties", "ChunkStorageMetadata", "TensorStorageMetadata",
                 "BytesStorageMetadata", "StorageMeta", "_MEM_FORMAT_ENCODING"):
        if hasattr(md, name):
            allowed[(md.__name__, name)] = getattr(md, name)
    allowed[(fs.__name__, "_StorageInfo")] = fs._StorageInfo
    allowed[("torch", "Size")] = torch.Size
    if hasattr(ser, "_get_layout"):
        allowed[("torch.serialization", "_get_layout")] = ser._get_layout
    for name in dir(torch):
        if isinstance(getattr(torch, name, None), torch.dtype):
            allowed[("torch", name)] = getattr(torch, name)
    for name in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"):
        allowed[("pathlib", name)] = getattr(pathlib, name)
    import collections

    allowed[("collections", "OrderedDict")] = collections.OrderedDict
    return allowed


METADATA_ALLOWED: dict[tuple[str, str], Any] = {}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if not METADATA_ALLOWED:
            METADATA_ALLOWED.update(_allowed())
        try:
            return METADATA_ALLOWED[(module, name)]
        except KeyError:
            raise UnsafeCheckpoint(f"DCP .metadata asks for {module}.{name}, which a checkpoint's metadata "
                                   "never holds: refused") from None


def load_metadata(stream) -> Any:
    return _MetadataUnpickler(stream).load()


def _reader_classes():
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class SafeFileSystemReader(FileSystemReader):
        """DCP's file reader, but ``.metadata`` goes through an allow-list unpickler."""

        def read_metadata(self, *args: Any, **kwargs: Any):
            rank = kwargs.get("rank")
            name = ".metadata" if rank is None else f"__{rank}.metadata"
            with self.fs.create_stream(self.fs.concat_path(self.path, name), "rb") as fh:
                metadata = load_metadata(fh)
            if hasattr(metadata, "storage_meta"):
                from torch.distributed.checkpoint.metadata import StorageMeta

                if metadata.storage_meta is None:
                    metadata.storage_meta = StorageMeta()
                metadata.storage_meta.load_id = getattr(self, "load_id", None)
            return metadata

    class SafeLoadPlanner(DefaultLoadPlanner):
        """DCP's load planner, but non-tensor items are read with ``weights_only=True``."""

        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            try:
                obj = torch.load(value, weights_only=True)
            except Exception as err:  # noqa: BLE001 - torch's refusal of a global, or garbage
                raise UnsafeCheckpoint(f"DCP item {read_item.dest_index.fqn} is not plain data: refused "
                                       f"({' '.join(str(err).split())[:200]})") from None
            if self.flatten_state_dict:
                from torch.distributed.checkpoint._traverse import set_element

                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return SafeFileSystemReader, SafeLoadPlanner


def dcp_load(state: dict[str, Any], directory: str) -> None:
    """``torch.distributed.checkpoint.load`` of ``state`` from ``directory`` with the safe reader and planner."""
    import warnings

    import torch.distributed.checkpoint as dcp

    import logging
    import os

    # Refuse a crafted .metadata here, the same on every rank, before DCP's own machinery reads it (which
    # would log each rank's refusal as a traceback and fall back to per-rank metadata files).
    with open(os.path.join(directory, ".metadata"), "rb") as fh:
        load_metadata(fh)
    reader_cls, planner_cls = _reader_classes()
    quiet = logging.getLogger("torch.distributed.checkpoint")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # failures reach the caller as exceptions; no traceback per rank
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message=".*single process")
            dcp.load(state, storage_reader=reader_cls(directory), planner=planner_cls())
    finally:
        quiet.setLevel(level)
