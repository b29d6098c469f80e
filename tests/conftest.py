"""Shared fixtures: tiny random-weight models in the real on-disk layout, loaded by the real loader."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dllm_engine.loading import load_model
from tests.helpers import make_model_dir

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def random_model_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("random-model"))


@pytest.fixture(scope="session")
def random_model(random_model_dir):
    return load_model(random_model_dir, dtype="float32")


@pytest.fixture(scope="session")
def eot_model(tmp_path_factory):
    """A model that ignores context and always predicts end-of-turn: it 'answers' at once.

    Blocks contribute nothing, every embedding has a large first coordinate, and only the
    end-of-turn row of the output head reads it.
    """
    model, tok = load_model(make_model_dir(tmp_path_factory.mktemp("eot-model")), dtype="float32")
    tr = model.model.transformer
    with torch.no_grad():
        for block in tr["blocks"]:
            block.attn_out.weight.zero_()
            block.ff_out.weight.zero_()
        tr["wte"].weight[:, 0] = 10.0
        tr["ff_out"].weight.zero_()
        tr["ff_out"].weight[tok.special.end_of_turn, 0] = 10.0
    return model, tok
