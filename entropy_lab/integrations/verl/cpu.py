"""A CPU platform for verl 0.9, so that its FSDP2 actor engine runs (gloo) without an accelerator.

verl 0.9.1 ships CUDA, NPU and ROCm platforms only: without a GPU its platform manager falls
back to ``nvidia`` and the FSDP engine stops in ``init_device_mesh("cuda")``
(``AttributeError: module 'torch._C' has no attribute '_cuda_setDevice'`` on a CPU-only torch).
``use_cpu_platform()`` installs this platform with verl's own ``set_platform`` and selects the
FSDP engine class with verl's ``VERL_ENGINE_DEVICE`` override (the engine is registered for
cuda/npu only). It is for tests and laptop experiments of the actor update (strategy
``fsdp2``, ``use_remove_padding=False``, eager attention); rollout engines are not covered.

Deliberate choice: ``current_device()`` returns ``"cpu"`` (not an index), because verl moves
modules with ``.to(get_device_id())``.
"""

from __future__ import annotations

import contextlib
import os
import types

import torch


def _cpu_device_module() -> types.SimpleNamespace:
    """The subset of ``torch.cuda``'s interface verl's engine calls, as CPU no-ops."""
    zero = lambda *a, **k: 0  # noqa: E731
    none = lambda *a, **k: None  # noqa: E731
    return types.SimpleNamespace(
        is_available=lambda: True,
        current_device=lambda: "cpu",
        device_count=lambda: 1,
        set_device=none,
        synchronize=none,
        manual_seed=torch.manual_seed,
        manual_seed_all=torch.manual_seed,
        empty_cache=none,
        max_memory_allocated=zero,
        max_memory_reserved=zero,
        memory_allocated=zero,
        memory_reserved=zero,
        reset_peak_memory_stats=none,
        mem_get_info=lambda *a: (0, 0),
        get_rng_state=torch.get_rng_state,
        set_rng_state=torch.set_rng_state,
    )


def make_cpu_platform():
    """An instance of verl's ``PlatformBase`` for the CPU."""
    from verl.plugin.platform.platform_base import PlatformBase

    module = _cpu_device_module()

    class PlatformCPU(PlatformBase):
        device_name = property(lambda self: "cpu")
        vendor_name = property(lambda self: "cpu")
        device_module = property(lambda self: module)

        def is_available(self):
            return True

        def current_device(self):
            return "cpu"

        def device_count(self):
            return 1

        def set_device(self, device_index):
            pass

        def synchronize(self, device_index=None):
            pass

        def manual_seed(self, seed):
            torch.manual_seed(seed)

        def manual_seed_all(self, seed):
            torch.manual_seed(seed)

        def set_allocator_settings(self, settings):
            pass

        def empty_cache(self):
            pass

        def get_device_capability(self, device_index=0):
            return (None, None)

        def communication_backend_name(self):
            return "gloo"

        def visible_devices_envvar(self):
            return "CPU_VISIBLE_DEVICES"

        @contextlib.contextmanager
        def nvtx_range(self, msg):
            yield

        def profiler_start(self):
            pass

        def profiler_stop(self):
            pass

        def ray_resource_name(self):
            return "CPU"

        def ray_noset_envvars(self):
            return []

        def is_ipc_supported(self):
            return False

        def cudart(self):
            return None

    return PlatformCPU()


def use_cpu_platform() -> None:
    """Make verl run its FSDP actor engine on the CPU in this process (call before building workers)."""
    from verl.plugin.platform.platform_manager import set_platform

    set_platform(make_cpu_platform())
    os.environ["VERL_ENGINE_DEVICE"] = "cuda"  # the FSDP engine class is registered for cuda/npu only
