"""The paper's CNN layer by layer, and model files on disk (weights + metadata + checksum)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shared.model_def import INPUT_SHAPE, PAPER_TABLE, TOTAL_PARAMS, build_model
from shared.model_store import (
    Classifier,
    ModelFileError,
    metadata_path,
    read_model_info,
    round_weights,
    save_weights,
    sha256_file,
    write_metadata,
)

#: Parameters per layer, as the paper publishes them (PAPER_TABLE is the code's copy).
EXPECTED_PARAMS = (896, 0, 18496, 0, 73856, 0, 0, 5537856, 65)


@pytest.fixture(scope="module")
def model() -> Any:
    return build_model(seed=7)


@pytest.fixture(scope="module")
def batch() -> np.ndarray:
    """Eight inputs from black to white, with structure so that they differ in more than mean."""
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (8, *INPUT_SHAPE)).astype(np.float32)
    x *= np.linspace(0.05, 1.0, 8, dtype=np.float32)[:, None, None, None]
    x[..., 1] = x[..., 2] = x[..., 0]
    return x


def test_input_shape(model: Any) -> None:
    assert tuple(model.input_shape) == (None, 224, 224, 3)
    assert tuple(model.output_shape) == (None, 1)


def test_layers_match_the_paper_table(model: Any) -> None:
    assert [layer.count_params() for layer in model.layers] == list(EXPECTED_PARAMS)
    assert len(model.layers) == len(PAPER_TABLE)
    for layer, (name, shape, params) in zip(model.layers, PAPER_TABLE, strict=True):
        assert layer.name == name
        assert tuple(layer.output.shape)[1:] == shape, name
        assert layer.count_params() == params, name


def test_layer_configuration(model: Any) -> None:
    layers = {layer.name: layer.get_config() for layer in model.layers}
    for name in ("conv1", "conv2", "conv3"):
        assert tuple(layers[name]["kernel_size"]) == (3, 3)
        assert layers[name]["padding"] == "valid"
        assert layers[name]["activation"] == "relu"
    for name in ("pool1", "pool2", "pool3"):
        assert tuple(layers[name]["pool_size"]) == (2, 2)
    assert layers["dense"]["activation"] == "relu"
    assert layers["output"]["activation"] == "sigmoid"


def test_total_parameters(model: Any) -> None:
    assert model.count_params() == TOTAL_PARAMS == 5_631_169
    assert sum(int(np.prod(w.shape)) for w in model.get_weights()) == TOTAL_PARAMS


def test_output_is_a_probability(model: Any, batch: np.ndarray) -> None:
    out = np.asarray(model(batch, training=False))
    assert out.shape == (len(batch), 1)
    assert np.all(out > 0.0)
    assert np.all(out < 1.0)


def test_seed_makes_weights_reproducible(model: Any) -> None:
    again = build_model(seed=7)
    for a, b in zip(model.get_weights(), again.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------- model files


def _write_model(model: Any, path: Path, **extra: Any) -> dict[str, Any]:
    digest = save_weights(model, path)
    meta = {
        "version": "test-1.2.3",
        "sha256": digest,
        "threshold": 0.42,
        "preprocess": {"crop_fraction": 0.05, "clahe": True},
        **extra,
    }
    write_metadata(path, meta)
    return meta


def test_save_and_read_model_info_round_trip(model: Any, tmp_path: Path) -> None:
    path = tmp_path / "models" / "m.npz"
    meta = _write_model(model, path, metrics={"auc": 0.9})
    assert path.is_file()
    assert metadata_path(path) == tmp_path / "models" / "m.json"
    assert meta["sha256"] == sha256_file(path)
    assert json.loads(metadata_path(path).read_text())["version"] == "test-1.2.3"

    info = read_model_info(path)
    assert info.path == path
    assert info.version == "test-1.2.3"
    assert info.sha256 == meta["sha256"]
    assert info.threshold == pytest.approx(0.42)
    assert info.preprocess.crop_fraction == pytest.approx(0.05)
    assert info.preprocess.clahe is True
    assert info.metadata["metrics"] == {"auc": 0.9}
    assert info.label(0.42) == "covid"
    assert info.label(0.4199) == "non-covid"

    with np.load(path) as npz:
        stored = [npz[k] for k in sorted(npz.files)]
    assert all(w.dtype == np.float16 for w in stored)
    assert [w.shape for w in stored] == [w.shape for w in model.get_weights()]
    assert not list(tmp_path.rglob("*.tmp.npz"))


def test_classifier_matches_the_rounded_keras_model(
    model: Any, batch: np.ndarray, tmp_path: Path
) -> None:
    path = tmp_path / "m.npz"
    _write_model(model, path)
    rounded = build_model()
    rounded.set_weights(model.get_weights())
    round_weights(rounded)
    expected = np.asarray(rounded(batch, training=False)).reshape(-1)
    assert np.ptp(expected) > 1e-4  # the batch tells weights apart

    classifier = Classifier.load(path)
    assert classifier.info.version == "test-1.2.3"
    got = classifier.predict(batch, batch_size=3)  # several batches, one partial
    assert got.shape == (len(batch),)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert classifier.predict(np.zeros((0, *INPUT_SHAPE), np.float32)).shape == (0,)


def test_round_weights_rounds_to_float16(model: Any) -> None:
    copy = build_model()
    copy.set_weights(model.get_weights())
    round_weights(copy)
    for original, rounded in zip(model.get_weights(), copy.get_weights(), strict=True):
        np.testing.assert_array_equal(rounded, original.astype(np.float16).astype(np.float32))


def test_tampered_weights_are_refused(model: Any, tmp_path: Path) -> None:
    path = tmp_path / "m.npz"
    _write_model(model, path)
    read_model_info(path)  # fine before
    with open(path, "ab") as fh:
        fh.write(b"\x00")
    with pytest.raises(ModelFileError, match="checksum"):
        read_model_info(path)
    with pytest.raises(ModelFileError):
        Classifier.load(path)
    assert read_model_info(path, verify=False).version == "test-1.2.3"


def test_missing_metadata_is_refused(model: Any, tmp_path: Path) -> None:
    path = tmp_path / "m.npz"
    _write_model(model, path)
    metadata_path(path).unlink()
    with pytest.raises(ModelFileError):
        read_model_info(path)


def test_missing_weights_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "absent.npz"
    write_metadata(path, {"version": "v", "sha256": "0" * 64, "threshold": 0.5})
    with pytest.raises(ModelFileError, match="not found"):
        read_model_info(path)


@pytest.mark.parametrize("missing", ["version", "sha256", "threshold"])
def test_incomplete_metadata_is_refused(model: Any, tmp_path: Path, missing: str) -> None:
    path = tmp_path / "m.npz"
    meta = _write_model(model, path)
    del meta[missing]
    write_metadata(path, meta)
    with pytest.raises(ModelFileError, match=missing):
        read_model_info(path)


def test_unparsable_metadata_is_refused(model: Any, tmp_path: Path) -> None:
    path = tmp_path / "m.npz"
    _write_model(model, path)
    metadata_path(path).write_text("{not json")
    with pytest.raises(ModelFileError):
        read_model_info(path)
