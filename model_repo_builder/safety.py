"""Model files whose loading would run code they carry: pickles, Keras Lambda layers and custom objects, and
SavedModel ops that TensorFlow does not register or that call into Python."""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from model_repo_builder.errors import BadInputError, UnsafeModelError

OPT_IN_FLAG = "--allow-unsafe-deserialization"
_OPT_IN = (f"if you trust whoever made the file, pass {OPT_IN_FLAG} (spec.model.allowUnsafeDeserialization: true): "
           "the builder then runs the code the file carries")  # fmt: skip
PICKLE_SUFFIXES = (".pkl", ".pickle", ".joblib", ".dill", ".pt", ".pth")
PICKLE_PROTOCOLS = (2, 3, 4, 5)  # binary pickles open with PROTO n; protocols 0 and 1 have no magic
PYTHON_OPS = frozenset({"PyFunc", "PyFuncStateless", "EagerPyFunc"})  # tf.numpy_function, tf.py_function
MAX_KERAS_CONFIG = 64 << 20  # config.json is read into memory: a real one is kilobytes
# Encodings of plain values in a Keras config (a tensor, an array, a slice ...), not classes to import.
_KERAS_VALUES = frozenset({"__keras_tensor__", "__tensor__", "__numpy__", "__bytes__", "__ellipsis__", "__slice__",
                           "__typespec__", "__tuple__"})  # fmt: skip

# (name, size, open) of each file of a model: in a directory, in a zip (a .keras file), or the file itself.
_Entry = tuple[str, int, Callable[[], IO[bytes]]]


def check_source(path: Path, fmt: str, *, allow_unsafe: bool = False) -> None:
    """Refuse (UnsafeModelError) a source whose loading would run code from it: pickled files anywhere in it and,
    for Keras, Lambda layers and custom objects, unless `allow_unsafe`. SavedModel ops that cannot run here (not
    registered, or calling Python) are refused either way: no opt-in makes them loadable."""
    if not allow_unsafe:
        pickles = find_pickles(path)
        if pickles:
            raise UnsafeModelError(
                f"{path.name} holds pickled Python objects, which run code when loaded: {', '.join(pickles[:5])}"
                + (f" and {len(pickles) - 5} more" if len(pickles) > 5 else ""),
                f"remove them from the model (the builder never reads them); {_OPT_IN}",
            )
        if fmt == "keras":
            _refuse_keras_code(path)
    if fmt == "savedmodel":
        _refuse_savedmodel_ops(path)


def find_pickles(path: Path) -> list[str]:
    """Files of `path` (a directory, a zip such as a .keras file, or one file) that are or hold pickles."""
    return [f"{name} ({why})" for name, size, open_ in _entries(path) if (why := _pickled(name, size, open_))]


def _entries(path: Path) -> Iterator[_Entry]:
    if path.is_dir():
        for dirpath, _, filenames in os.walk(path):
            for name in sorted(filenames):
                file = Path(dirpath) / name
                if file.is_file():
                    yield file.relative_to(path).as_posix(), file.stat().st_size, _opener(file)
    elif zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if not info.is_dir():
                    yield info.filename, info.file_size, _member_opener(zf, info)
    else:
        yield path.name, path.stat().st_size, _opener(path)


def _opener(file: Path) -> Callable[[], IO[bytes]]:
    return lambda: file.open("rb")


def _member_opener(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> Callable[[], IO[bytes]]:
    return lambda: zf.open(info)


def _pickled(name: str, size: int, open_: Callable[[], IO[bytes]]) -> str | None:
    """Why the file is or holds a pickle, or None."""
    lower = name.lower()
    if lower.endswith(PICKLE_SUFFIXES):
        return "a pickle file by its name"
    with open_() as f:
        if _pickle_magic(f, size):
            return "pickled data"
    if lower.endswith(".npy"):
        with open_() as f:
            return "an array of Python objects" if _npy_holds_objects(f) else None
    if lower.endswith(".npz"):
        with open_() as f, zipfile.ZipFile(f) as npz:
            holding = [i.filename for i in npz.infolist() if _npy_holds_objects(npz.open(i))]
        return f"arrays of Python objects: {', '.join(holding)}" if holding else None
    return None


def _pickle_magic(f: IO[bytes], size: int) -> bool:
    """A binary pickle starts with PROTO (0x80, then 2-5) and ends with STOP ('.'): weights rarely do both."""
    head = f.read(2)
    if len(head) < 2 or head[0] != 0x80 or head[1] not in PICKLE_PROTOCOLS:
        return False
    f.seek(size - 1)
    return f.read(1) == b"."


def _npy_holds_objects(f: IO[bytes]) -> bool:
    """Whether an .npy stream's header declares Python objects (stored as a pickle after the header)."""
    import numpy as np

    fmt: Any = np.lib.format  # untyped in numpy's stubs
    try:
        version = fmt.read_magic(f)
        # Version 3 differs from 2 only in the header's text encoding, which does not hide an object dtype.
        header = fmt.read_array_header_1_0(f) if version == (1, 0) else fmt.read_array_header_2_0(f)
    except ValueError:
        return False  # not an array at all: numpy refuses it without unpickling anything
    return bool(header[2].hasobject)


def _refuse_keras_code(path: Path) -> None:
    findings = list(dict.fromkeys(keras_code(_keras_config(path))))
    if findings:
        raise UnsafeModelError(
            f"{path.name} carries code that Keras would run or import when loading it: {'; '.join(findings)}",
            "export a SavedModel instead (model.export(path): its graph needs no Python), or replace custom layers "
            f"with built-in ones. For Lambda layers only, {_OPT_IN} (custom classes cannot be imported either way)",
        )


def _keras_config(path: Path) -> Any:
    """config.json of a .keras archive, read with a size bound."""
    try:
        with zipfile.ZipFile(path) as zf:
            info = zf.getinfo("config.json")
            if info.file_size > MAX_KERAS_CONFIG:
                raise BadInputError(f"{path.name}: config.json is {info.file_size} bytes", "re-export the model")
            with zf.open(info) as f:
                return json.loads(f.read(MAX_KERAS_CONFIG + 1))
    except KeyError as exc:
        hint = "re-export it with model.save()"
        raise BadInputError(f"{path.name} is not a Keras archive (no config.json)", hint) from exc
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise BadInputError(f"{path.name} is not a valid .keras archive ({exc})", "re-export the model") from exc


def keras_code(node: Any, owner: str | None = None) -> Iterator[str]:
    """What in a Keras config would run Python stored in the file, or import a class or function that is not
    Keras' own. compile_config is skipped: the builder loads with compile=False, so losses and metrics are not
    deserialized."""
    if isinstance(node, list):
        for item in node:
            yield from keras_code(item, owner)
        return
    if not isinstance(node, dict):
        return
    if "class_name" in node:
        finding = _keras_object(node, owner)
        if finding:
            yield finding
        owner = _object_name(node) or owner
    for key, value in node.items():
        if key != "compile_config":
            yield from keras_code(value, owner)


def _object_name(node: dict[str, Any]) -> str | None:
    config = node.get("config")
    name = config.get("name") if isinstance(config, dict) else None
    return name if isinstance(name, str) else None


def _is_keras(module: object) -> bool:
    return isinstance(module, str) and (module == "keras" or module.startswith("keras."))


def _keras_object(node: dict[str, Any], owner: str | None) -> str | None:
    cls, module, registered = node.get("class_name"), node.get("module"), node.get("registered_name")
    where = f" in layer {owner!r}" if owner else ""
    if cls in ("Lambda", "__lambda__"):
        return f"Lambda layer {_object_name(node) or owner!r} (Python code stored in the file)"
    if cls == "function":
        # The function's name is the config: Keras' own by plain name (module builtins or keras.*), registered
        # custom ones as "package>name".
        name = node.get("config")
        if (module == "builtins" or _is_keras(module)) and ">" not in str(name):
            return None
        return f"custom function {name!r} from module {module!r}{where}"
    if cls in _KERAS_VALUES:
        return None
    if _is_keras(module) and registered in (None, cls):
        return None
    label = f"{cls} {_object_name(node)!r}" if _object_name(node) else f"{cls}{where}"
    return f"custom object {label} (module {module!r}, registered as {registered!r})"


def savedmodel_ops(path: Path) -> set[str]:
    """The op types of every graph and function in a SavedModel directory (function calls by name excluded)."""
    from google.protobuf.message import DecodeError
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    try:
        proto.ParseFromString((path / "saved_model.pb").read_bytes())
    except (DecodeError, OSError) as exc:
        raise BadInputError(f"{path}/saved_model.pb is not a SavedModel ({exc})", "re-export it") from exc
    ops: set[str] = set()
    for graph in (mg.graph_def for mg in proto.meta_graphs):
        functions = {f.signature.name for f in graph.library.function}
        ops |= {n.op for n in graph.node} - functions
        ops |= {n.op for f in graph.library.function for n in f.node_def} - functions
    return ops


def _refuse_savedmodel_ops(path: Path) -> None:
    import tensorflow  # noqa: F401  (registers TensorFlow's ops)
    from tensorflow.python.framework import op_def_registry  # the registry tf.saved_model.load resolves ops in

    ops = savedmodel_ops(path)
    python = sorted(ops & PYTHON_OPS)
    if python:
        raise UnsafeModelError(
            f"SavedModel {path.name} calls Python through {', '.join(python)} (tf.py_function / tf.numpy_function): "
            "the function is not in the file, so the graph cannot run or be converted here",
            "replace the Python function with TensorFlow ops and re-export the model",
        )
    unknown = sorted(op for op in ops if op_def_registry.get(op) is None)
    if unknown:
        raise UnsafeModelError(
            f"SavedModel {path.name} uses ops TensorFlow does not register: {', '.join(unknown)} (custom ops "
            "need their shared library, and the builder never loads one)",
            f"re-export the model with TensorFlow's built-in ops ({OPT_IN_FLAG} does not load op libraries)",
        )
