"""Renamed names keep working with a DeprecationWarning, and moved names are the same objects at their
old and new homes (issue #12: one batch contract, one naming)."""

from __future__ import annotations

import importlib
import warnings

import pytest
import torch
from models import MLP

from hardmine.engine import GradientExtractor
from hardmine.scan import Scan, scan


def _small_scan(tmp_path) -> Scan:
    torch.manual_seed(0)
    model = MLP(d_in=4, hidden=6, n_classes=3).eval()
    x, y = torch.randn(12, 4), torch.randint(0, 3, (12,))
    return scan(model, [(x[:6], y[:6]), (x[6:], y[6:])], out=tmp_path / "s", dim=16, engine="vmap")


def test_scan_dim_is_deprecated_in_favour_of_out_dim(tmp_path):
    sc = _small_scan(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out_dim = sc.out_dim  # the new name warns about nothing
    assert out_dim == sc.info["out_dim"] == sc.gradients().shape[1]
    with pytest.warns(DeprecationWarning, match=r"Scan\.dim.*out_dim"):
        assert sc.dim == out_dim
    assert "out_dim=" in repr(sc)


def test_extractor_kind_is_deprecated_in_favour_of_projection():
    torch.manual_seed(0)
    model = MLP().eval()
    batch = (torch.randn(5, 12), torch.randint(0, 4, (5,)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new = GradientExtractor(model, dim=16, projection="gaussian")
    with pytest.warns(DeprecationWarning, match=r"kind=.*projection="):
        old = GradientExtractor(model, dim=16, kind="gaussian")
    assert old.metadata() == new.metadata() and new.metadata()["projection"] == "gaussian"
    assert torch.equal(old(batch).z, new(batch).z)
    assert GradientExtractor(model, dim=16).metadata()["projection"] == "rademacher"
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="disagree"):
        GradientExtractor(model, dim=16, projection="rademacher", kind="gaussian")
    with pytest.raises(ValueError, match=r"projection='nope'.*'rademacher'"):
        GradientExtractor(model, dim=16, projection="nope")


def test_moved_names_are_the_same_objects():
    import hardmine.batches as batches
    import hardmine.enums as enums
    import hardmine.extract as extract
    import hardmine.loaders.data as data

    assert data.DataFormat is enums.DataFormat
    for name in ("split_batch", "call_model", "model_output_tensor", "validate_batch", "validate_inputs",
                 "validate_output", "forward_error", "Inputs"):
        assert getattr(extract, name) is getattr(batches, name), name


def test_one_model_fingerprint():
    from hardmine._io import model_fingerprint
    from hardmine.loaders.model import state_dict_fingerprint

    model = MLP()
    assert state_dict_fingerprint(model) == model_fingerprint(model) == model_fingerprint(model.state_dict())


def test_hardmine_scan_attribute_is_the_function_and_the_module_imports():
    import hardmine

    assert callable(hardmine.scan) and hardmine.scan is scan
    module = importlib.import_module("hardmine.scan")
    assert module.scan is scan and module.Scan is Scan
    assert {"scan", "Scan", "ScanProgress", "Neighbors", "SCAN_FILE", "MANIFEST_FILE"} <= set(module.__all__)
