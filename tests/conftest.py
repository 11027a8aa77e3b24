import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _kiln_home(tmp_path_factory, monkeypatch):
    """Each test sees its own ~/.kiln so user profiles don't leak between tests."""
    monkeypatch.setenv("KILN_HOME", str(tmp_path_factory.mktemp("kiln_home")))
