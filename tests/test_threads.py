"""The CPU thread default (issue 23: torch's default trained 5-9 times slower than one thread on
2 busy cores; benchmarks/threads.py): 1, declared once, the same for every entry point; 0 leaves
torch's own setting."""

from __future__ import annotations

import torch

from tasks.config import CpuThreads, RunConfig, TrainConfig, run_parameters
from tasks.runtime import torch_threads
from tests.test_parameters import _flat_help


def test_every_entry_point_defaults_to_one_thread_from_one_declaration(cli):
    field = CpuThreads.model_fields["threads"]
    assert field.default == 1 and RunConfig().threads == 1 and TrainConfig().threads == 1
    assert RunConfig.from_parameters({}).train_config("d", 0, RunConfig().model).threads == 1
    (parameter,) = [p for p in run_parameters() if p.name == "threads"]
    assert parameter.default == 1  # the flow's and the deployment's parameter, `rsir run`'s option
    why = " ".join(field.description.split()[:8])
    for command in ("run", "train", "experiment", "tune", "generate", "evaluate"):
        assert why in _flat_help(cli(command, "--help").out), command


def test_zero_threads_keeps_torchs_setting():
    before = torch.get_num_threads()
    with torch_threads(0):
        assert torch.get_num_threads() == before
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
