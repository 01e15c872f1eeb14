"""cli.py: the --threads rule shared by train.py, sample.py and the experiments, and the meta-device parameter count.

Oracles: torch.get_num_threads() after each call (the rule's three cases written out in the test), and the
parameter count of the world's reference model actually loaded with load_pretrained.
"""
import pytest
import torch

from spl.cli import SMALL_MODEL_PARAMETERS, UsageError, checkpoint_parameters, choose_threads
from data.world import MODEL_DIR
from models import load_pretrained


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


def test_automatic_threads_are_one_for_a_small_model_on_cpu_only(restore_threads):
    torch.set_num_threads(2)
    assert choose_threads(0, SMALL_MODEL_PARAMETERS - 1, "cpu") == 1 == torch.get_num_threads()
    torch.set_num_threads(2)
    assert choose_threads(0, SMALL_MODEL_PARAMETERS, "cpu") == 2  # a large model keeps torch's choice
    assert choose_threads(0, 1000, "cuda") == 2  # the GPU does the work; CPU threads are left alone
    assert choose_threads(3, 1000, "cpu") == 3 == torch.get_num_threads()  # an explicit count always wins
    with pytest.raises(UsageError, match="--threads must be >= 0"):
        choose_threads(-1, 1000, "cpu")


def test_checkpoint_parameters_equal_the_loaded_model():
    assert checkpoint_parameters(MODEL_DIR) == load_pretrained(MODEL_DIR).num_parameters()
