"""The end-to-end example trains to a recall@1 far above chance on real digits."""
import importlib.util
import pathlib

import pytest

pytest.importorskip("sklearn")
EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "train_retrieval.py"


def test_example_improves_recall_well_above_chance():
    spec = importlib.util.spec_from_file_location("train_retrieval", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.train(epochs=4, log=lambda *_: None)
    assert result["before"] < 0.25  # about chance (0.1) before training
    assert result["after"] > 0.6, result  # 6x chance after a few epochs
