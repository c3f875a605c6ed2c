"""Device selection: `auto` never falls back to the CPU silently when the job asked for a GPU."""

import warnings

import pytest
import torch

from redi import devices
from redi.errors import ReDiError

NO_GPU_ENV = ("CUDA_VISIBLE_DEVICES", "SLURM_GPUS_ON_NODE", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "REDI_GPUS")


@pytest.fixture
def no_request(monkeypatch):
    for name in NO_GPU_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def cuda_build(monkeypatch, available, count=0, warning=None, count_error=None):
    """Make torch look like a CUDA 12.4 build whose is_available / device count behave as given."""
    monkeypatch.setattr(torch.version, "cuda", "12.4")

    def is_available():
        if warning:
            warnings.warn(warning, UserWarning, stacklevel=2)
        return available

    def device_count():
        if count_error:
            raise RuntimeError(count_error)
        return count

    monkeypatch.setattr(torch.cuda, "is_available", is_available)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch._C, "_cuda_getDeviceCount", device_count, raising=False)


def test_auto_without_a_request_uses_the_cpu_when_cuda_is_unusable(no_request):
    cuda_build(no_request, available=False, count=0)
    assert devices.resolve_device("auto") == torch.device("cpu")


def test_auto_picks_cuda_when_usable(no_request):
    cuda_build(no_request, available=True, count=2)
    assert devices.resolve_device("auto") == torch.device("cuda")


@pytest.mark.parametrize("variable, value", [("CUDA_VISIBLE_DEVICES", "0,1"), ("SLURM_GPUS_ON_NODE", "4"),
                                             ("SLURM_JOB_GPUS", "2"), ("REDI_GPUS", "1")])
def test_a_requested_gpu_that_is_missing_is_an_error(no_request, variable, value):
    cuda_build(no_request, available=False, count=0)
    no_request.setenv(variable, value)
    with pytest.raises(ReDiError, match=rf"a GPU was requested \({variable}={value}.*no CUDA device visible "
                                        r"\(torch.cuda.device_count\(\) = 0"):
        devices.resolve_device("auto")


def test_an_empty_or_disabled_allocation_is_no_request(no_request):
    cuda_build(no_request, available=False)
    for value in ("", "-1", "NoDevFiles"):
        no_request.setenv("CUDA_VISIBLE_DEVICES", value)
        assert devices.gpu_requested() is None
    no_request.setenv("SLURM_GPUS_ON_NODE", "0")
    assert devices.resolve_device("auto") == torch.device("cpu")


def test_a_cpu_only_torch_is_named(no_request):
    no_request.setattr(torch.version, "cuda", None)
    no_request.setattr(torch.version, "hip", None, raising=False)
    no_request.setenv("SLURM_JOB_GPUS", "0")  # SLURM's device index list: GPU 0 allocated
    with pytest.raises(ReDiError, match=r"SLURM_JOB_GPUS=0.*is built without CUDA"):
        devices.resolve_device("auto")
    with pytest.raises(ReDiError, match=r"^device cuda: this torch .* built without CUDA"):
        devices.resolve_device("cuda")


def test_a_driver_too_old_is_reported_in_torchs_words(no_request):
    old = "CUDA initialization: The NVIDIA driver on your system is too old (found version 11040)."
    cuda_build(no_request, available=False, warning=old)
    no_request.setenv("CUDA_VISIBLE_DEVICES", "0")
    with pytest.raises(ReDiError, match=r"cannot use the GPU: CUDA initialization: The NVIDIA driver on your "
                                        r"system is too old \(found version 11040\)"):
        devices.resolve_device("auto")


def test_a_device_count_error_is_reported_when_no_warning_came(no_request):
    cuda_build(no_request, available=False, count_error="CUDA driver initialization failed")
    with pytest.raises(ReDiError, match="RuntimeError: CUDA driver initialization failed"):
        devices.resolve_device("cuda")


def test_an_index_beyond_the_visible_devices_is_an_error(no_request):
    cuda_build(no_request, available=True, count=2)
    assert devices.resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ReDiError, match=r"device cuda:2: only 2 CUDA device\(s\) visible"):
        devices.resolve_device("cuda:2")


def test_cpu_is_always_allowed(no_request):
    no_request.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert devices.resolve_device("cpu") == torch.device("cpu")


def test_one_precision_rule_for_train_and_sample():
    from redi.devices import uses_bf16

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [uses_bf16(p, cpu) for p in ("auto", "fp32", "bf16")] == [False, False, True]
    assert [uses_bf16(p, cuda) for p in ("auto", "fp32", "bf16")] == [True, False, True]
