"""Untrusted models, made here: Keras Lambda layers and custom objects, SavedModels with custom or Python ops,
pickles in trees and archives. Refused by default naming what was found; the opt-in really runs the file's code."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from model_repo_builder import convert, parity, safety
from model_repo_builder.config import ModelSignature, TensorSpec
from model_repo_builder.errors import BadInputError, UnsafeModelError
from tests.builder.helpers import run_cli, snapshot

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("untrusted")


@pytest.fixture(scope="module")
def lambda_keras(made: Path) -> tuple[Path, Path]:
    """A Keras model whose Lambda layer writes a marker file whenever Keras runs it (as loading does)."""
    import keras

    marker = made / "lambda-ran"
    code = f"lambda t: t * 2.0 if __import__('pathlib').Path({str(marker)!r}).write_text('ran') else t"
    inp = keras.Input(shape=(4,), name="features")
    h = keras.layers.Lambda(eval(code), name="side_effect")(inp)  # eval: marshal keeps the path as a constant
    out = keras.layers.Dense(1, activation="sigmoid", name="score")(h)
    path = made / "lambda.keras"
    keras.Model(inp, out).save(path)
    marker.unlink()  # building the model ran the lambda; only loading may run it again
    return path, marker


@pytest.fixture(scope="module")
def custom_keras(made: Path) -> Path:
    """A Keras model with a registered custom layer and a registered custom activation."""
    import keras

    @keras.saving.register_keras_serializable(package="hostile")
    class Scale(keras.layers.Layer):
        def call(self, x: Any) -> Any:
            return x * 3.0

    @keras.saving.register_keras_serializable(package="hostile")
    def doubled_relu(x: Any) -> Any:
        return keras.ops.relu(x) * 2.0

    inp = keras.Input(shape=(4,), name="features")
    h = keras.layers.Dense(8, activation=doubled_relu, name="hidden")(inp)
    out = keras.layers.Dense(1, name="score")(Scale(name="scale")(h))
    path = made / "custom.keras"
    keras.Model(inp, out).save(path)
    return path


@pytest.fixture(scope="module")
def savedmodel(made: Path) -> Path:
    """A plain SavedModel: one variable, MatMul and Sigmoid, a serving_default signature."""
    import tensorflow as tf

    class Scorer(tf.Module):
        def __init__(self) -> None:
            self.w = tf.Variable(tf.fill([4, 1], 0.25))

        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="features")])
        def serve(self, x: Any) -> dict[str, Any]:
            return {"score": tf.sigmoid(tf.matmul(x, self.w))}

    scorer = Scorer()
    path = made / "plain_savedmodel"
    tf.saved_model.save(scorer, str(path), signatures={"serving_default": scorer.serve})
    return path


def _with_op_renamed(src: Path, dest: Path, old: str, new: str) -> Path:
    """A copy of a SavedModel whose graph functions call op `new` where they called `old` (a custom op)."""
    from tensorflow.core.protobuf import saved_model_pb2

    shutil.copytree(src, dest)
    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((src / "saved_model.pb").read_bytes())
    nodes = [n for mg in proto.meta_graphs for f in mg.graph_def.library.function for n in f.node_def if n.op == old]
    assert nodes, f"no {old} op to rename"
    for node in nodes:
        node.op = new
    (dest / "saved_model.pb").write_bytes(proto.SerializeToString())
    return dest


@pytest.fixture(scope="module")
def py_function_savedmodel(made: Path) -> Path:
    import tensorflow as tf

    class Scorer(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="features")])
        def serve(self, x: Any) -> dict[str, Any]:
            y = tf.py_function(lambda a: a * 2.0, [x], tf.float32)
            return {"score": tf.reduce_sum(tf.reshape(y, [-1, 4]), axis=1, keepdims=True)}

    scorer = Scorer()
    path = made / "py_function_savedmodel"
    tf.saved_model.save(scorer, str(path), signatures={"serving_default": scorer.serve})
    return path


def test_a_keras_lambda_layer_is_refused_before_it_runs_and_runs_only_when_allowed(
    lambda_keras: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, marker = lambda_keras
    repo = tmp_path / "repo"
    r = run_cli(capsys, "build", "--source", path, "--repo", repo, "--name", "m", "--json")
    assert r.code == 3, r.err
    err = r.json
    assert err["error_type"] == "UnsafeModelError" and "Lambda layer 'side_effect'" in err["error"]
    assert "--allow-unsafe-deserialization" in err["hint"] and "spec.model.allowUnsafeDeserialization" in err["hint"]
    assert not marker.exists() and snapshot(repo) == {}

    r = run_cli(capsys, "build", "--source", path, "--repo", repo, "--name", "m", "--json",
                "--allow-unsafe-deserialization", "--parity-samples", "64")  # fmt: skip
    assert r.code == 0, r.err
    assert marker.read_text() == "ran"  # what the opt-in means: the file's own code ran in the builder
    build = json.loads((repo / "m" / "1" / "build.json").read_text())
    assert build["unsafe_deserialization"] is True


def test_custom_keras_objects_are_refused_naming_them(
    custom_keras: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    r = run_cli(capsys, "inspect", custom_keras, "--json")
    assert r.code == 3, r.err
    err = r.json
    assert err["error_type"] == "UnsafeModelError"
    assert "custom function 'hostile>doubled_relu' from module 'builtins' in layer 'hidden'" in err["error"]
    scale = "custom object Scale 'scale' (module 'tests.builder.test_untrusted', registered as 'hostile>Scale')"
    assert scale in err["error"]
    assert "model.export" in err["hint"]


def _obj(cls: str, module: str | None, config: Any, registered: str | None = None) -> dict[str, Any]:
    return {"class_name": cls, "module": module, "config": config, "registered_name": registered}


DENSE = _obj("Dense", "keras.layers", {"name": "dense", "activation": "relu",
                                       "kernel_initializer": _obj("GlorotUniform", "keras.initializers", {})})


@pytest.mark.parametrize(
    ("config", "found"),
    [
        (_obj("Functional", "keras.src.models.functional", {"layers": [DENSE]}, "Functional"), []),
        (_obj("Sequential", "keras", {"layers": [DENSE]}), []),
        (_obj("Dense", "keras.layers", {"name": "d", "activation": _obj("function", "builtins", "gelu", "function")}),
         []),
        (_obj("Lambda", "keras.layers", {"name": "l", "function": _obj("__lambda__", None, {"value": "..."})}),
         ["Lambda layer 'l' (Python code stored in the file)", "Lambda layer 'l' (Python code stored in the file)"]),
        (_obj("Dense", "keras.layers", {"name": "d", "activation": _obj("function", "os", "system", "function")}),
         ["custom function 'system' from module 'os' in layer 'd'"]),
        (_obj("Dense", "keras.layers", {"name": "d", "activation": _obj("function", "builtins", "pkg>f", "function")}),
         ["custom function 'pkg>f' from module 'builtins' in layer 'd'"]),
        (_obj("Evil", "my_package.layers", {"name": "e"}),
         ["custom object Evil 'e' (module 'my_package.layers', registered as None)"]),
        (_obj("Dense", "keras.layers", {"name": "d"}, "pkg>Dense"),
         ["custom object Dense 'd' (module 'keras.layers', registered as 'pkg>Dense')"]),
        ({"config": {"layers": [DENSE]}, "compile_config": {"loss": _obj("FocalLoss", None, {}, "pkg>FocalLoss")}},
         []),
    ],
    ids=[
        "a functional model of built-in layers is safe",
        "a sequential model is safe",
        "a built-in activation saved by name is safe",
        "a Lambda layer and its bytecode are code",
        "a function from a module other than keras is code",
        "a registered custom function is code",
        "a layer from another package is code",
        "a built-in class under a registered name is a custom object",
        "a custom loss in compile_config is skipped: the builder loads with compile=False",
    ],
)
def test_keras_config_findings(config: dict[str, Any], found: list[str]) -> None:
    assert list(safety.keras_code(config)) == found


@pytest.mark.parametrize("allow", [False, True], ids=["by default", "even with the opt-in"])
def test_a_savedmodel_with_a_custom_op_is_refused_naming_it(
    savedmodel: Path, tmp_path: Path, allow: bool
) -> None:
    custom = _with_op_renamed(savedmodel, tmp_path / "custom", "Sigmoid", "RecServeFancySigmoid")
    with pytest.raises(UnsafeModelError, match=r"ops TensorFlow does not register: RecServeFancySigmoid") as info:
        convert.load_source(custom, "savedmodel", allow_unsafe=allow)
    assert "never loads" in info.value.message and info.value.exit_code == 3


@pytest.mark.parametrize("allow", [False, True], ids=["by default", "even with the opt-in"])
def test_a_savedmodel_calling_python_is_refused(py_function_savedmodel: Path, allow: bool) -> None:
    with pytest.raises(UnsafeModelError, match=r"calls Python through EagerPyFunc"):
        convert.load_source(py_function_savedmodel, "savedmodel", allow_unsafe=allow)


def test_a_plain_savedmodel_passes_the_checks_and_loads(savedmodel: Path) -> None:
    assert {"MatMul", "Sigmoid"} <= safety.savedmodel_ops(savedmodel)
    source = convert.load_source(savedmodel, "savedmodel")
    assert [t.name for t in source.signature.inputs] == ["features"]


class _Payload:
    """Unpickling this creates a marker file: what a hostile pickle does, harmlessly."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def _object_array() -> np.ndarray:
    return np.array([{"a": 1}, None], dtype=object)


def _npy(data: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, data, allow_pickle=True)
    return buf.getvalue()


def _npz(**arrays: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


FLOATS_LIKE_PICKLE = b"\x80\x02" + np.arange(64, dtype=np.float32).tobytes()  # PROTO's bytes, no STOP at the end


@pytest.mark.parametrize(
    ("name", "data", "why"),
    [
        ("tokenizer.pkl", b"not even a pickle", "a pickle file by its name"),
        ("features.joblib", b"\x78\x9c compressed", "a pickle file by its name"),
        ("assets/blob", pickle.dumps({"w": 1}, protocol=2), "pickled data"),
        ("assets/blob5", pickle.dumps({"w": 1}, protocol=5), "pickled data"),
        ("assets/objects.npy", _npy(_object_array()), "an array of Python objects"),
        ("assets/mixed.npz", _npz(floats=np.ones(3), objects=_object_array()), "arrays of Python objects: objects.npy"),
        ("assets/floats.npy", _npy(np.ones((2, 3), np.float32)), None),
        ("assets/floats.npz", _npz(floats=np.ones(3)), None),
        ("variables/variables.data-00000-of-00001", FLOATS_LIKE_PICKLE, None),
        ("saved_model.pb", b"\x08\x01\x12\x00", None),
    ],
    ids=[
        "a .pkl file, whatever it holds",
        "a .joblib file (compressed joblib has no pickle magic)",
        "a protocol 2 pickle without an extension",
        "a protocol 5 pickle without an extension",
        "an .npy of Python objects",
        "an .npz holding one array of Python objects",
        "an .npy of floats",
        "an .npz of floats",
        "weights that start like a pickle but do not end like one",
        "a protobuf",
    ],
)
def test_pickles_in_a_model_tree_are_found(tmp_path: Path, name: str, data: bytes, why: str | None) -> None:
    tree = tmp_path / "sm"
    (tree / name).parent.mkdir(parents=True, exist_ok=True)
    (tree / name).write_bytes(data)
    assert safety.find_pickles(tree) == ([f"{name} ({why})"] if why else [])
    packed = tmp_path / "model.keras"
    with zipfile.ZipFile(packed, "w") as zf:
        zf.write(tree / name, name)
    assert safety.find_pickles(packed) == ([f"{name} ({why})"] if why else [])  # the same inside a zip


def test_a_pickle_inside_an_archive_is_refused_unless_allowed(
    savedmodel: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "unpickled"
    tree = tmp_path / "src" / "scorer"
    shutil.copytree(savedmodel, tree)
    (tree / "assets").mkdir(exist_ok=True)
    (tree / "assets" / "preprocess.joblib").write_bytes(pickle.dumps(_Payload(marker)))
    source = tmp_path / "scorer.tar.gz"
    with tarfile.open(source, "w:gz") as tf:
        tf.add(tree, arcname="scorer")
    repo = tmp_path / "repo"
    r = run_cli(capsys, "build", "--source", source, "--repo", repo, "--name", "m", "--json")
    assert r.code == 3, r.err
    assert r.json["error_type"] == "UnsafeModelError"
    assert "holds pickled Python objects" in r.json["error"] and "assets/preprocess.joblib" in r.json["error"]
    assert "--allow-unsafe-deserialization" in r.json["hint"]
    assert snapshot(repo) == {}

    r = run_cli(capsys, "build", "--source", source, "--repo", repo, "--name", "m", "--json",
                "--allow-unsafe-deserialization", "--parity-samples", "64")  # fmt: skip
    assert r.code == 0, r.err
    assert not marker.exists()  # allowed through, and still never unpickled: the builder has no use for it


def test_a_pickle_inside_a_keras_archive_is_refused(lambda_keras: tuple[Path, Path], tmp_path: Path) -> None:
    src, _ = lambda_keras
    path = tmp_path / "with_pickle.keras"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(path, "w") as zout:
        for item in zin.infolist():
            zout.writestr(item, zin.read(item))
        zout.writestr("assets/state", pickle.dumps(_Payload(tmp_path / "unpickled"), protocol=4))
    with pytest.raises(UnsafeModelError, match=r"assets/state \(pickled data\)"):
        convert.load_source(path, "keras")


def test_parity_data_holding_python_objects_is_bad_input_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "parity.npz"
    path.write_bytes(_npz(features=_object_array()))
    signature = ModelSignature((TensorSpec("features", "float32", (4,)),), (TensorSpec("score", "float32", (1,)),))
    with pytest.raises(BadInputError, match=r"'features' holds Python objects, which load by unpickling"):
        parity.load_parity_data(path, signature)
