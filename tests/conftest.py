"""Shared fixtures: small random models built once per session, offline everywhere."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_model():
    from fusedvlm.model import FusedVLM

    torch.manual_seed(0)
    return FusedVLM.from_preset("tiny").eval()


@pytest.fixture(scope="session")
def photo():
    from fusedvlm.samples import sample_image

    return sample_image("coffee")
