"""Host synchronisations the exact tier adds to a forward: at most one (issue 12), on any device.

A sync is a call that makes the host wait for the device: reading a device tensor's value
(`.item()`, `.tolist()`, `.numpy()`, a tensor's `bool`/`int`/`float`/`index`), an op whose
output size depends on device data (`nonzero`/`argwhere`, `unique`, `masked_select`, indexing
with a boolean tensor), and every blocking copy between host and device in either direction
(`.cpu()`, `.to("cpu")`, `.to(device)` of a host tensor, `copy_`, `torch.tensor(data,
device=...)`): torch runs those as cudaMemcpyAsync then cudaStreamSynchronize, so an upload in
the middle of a forward waits for every kernel queued before it. A `non_blocking=True` copy is
counted apart, as asynchronous (on CUDA it is only when the host side is pinned memory: from
pageable memory the driver may stage it synchronously). Empty tensors copy nothing. A `TorchFunctionMode` counts these calls on the same batch run
uncached (`llmcache.bypass`) and cached (cold: every row misses, with an in-batch repeat; warm:
every row hits; mixed: hits, misses and a repeat), and the cached forward may add at most one.

On CPU every tensor is on the host, so the counter follows what would be on the device on CUDA:
the model's parameters, buffers and inputs, what factories placed with a `torch.device` make,
whatever an op computes from device tensors, and host tensors moved with `.to(<torch.device>)`;
`.cpu()` and `.to("cpu")` give host tensors (so the `.numpy()` of what `.cpu()` returned is
free, as on CUDA). One counter per test remembers what the cache made on the device in earlier
forwards. On CUDA residency is simply the tensor's device, and CUDA's own sync detector
(`set_sync_debug_mode`) also counts the syncs that happen inside ops. Every counted call is
reported with its call site.
"""

from __future__ import annotations

import collections
import traceback
import warnings
import weakref

import pytest
import torch
from helpers import batch
from models import DECODERS, tiny_model
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

import llmcache

READS = {"item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__"}
DATA_DEPENDENT = {"nonzero", "argwhere", "unique", "unique_consecutive", "masked_select"}
COPYING_FACTORIES = {"tensor", "as_tensor"}
FACTORIES = {"tensor", "as_tensor", "arange", "zeros", "ones", "empty", "full", "randint", "rand", "randn",
             "linspace", "eye", "zeros_like", "ones_like", "empty_like", "full_like"}
ADDED_SYNCS_MAX = 1  # per cached forward, over the same forward uncached (issue 12)


class SyncCounter(TorchFunctionMode):
    """Counts host syncs on device-resident tensors (see the module docstring), with call sites."""

    def __init__(self, resident: list[torch.Tensor]):
        super().__init__()
        self.cpu_run = all(t.device.type == "cpu" for t in resident)  # else residency is the device
        self.device: dict[int, weakref.ref] = {}
        self.sites: collections.Counter = collections.Counter()
        self.async_copies = 0
        for tensor in resident:
            self._mark(tensor)

    def _mark(self, tensor: torch.Tensor) -> None:
        self.device[id(tensor)] = weakref.ref(tensor)

    def _resident(self, tensor) -> bool:
        if not isinstance(tensor, torch.Tensor):
            return False
        if tensor.device.type != "cpu" or not self.cpu_run:
            return tensor.device.type != "cpu"
        ref = self.device.get(id(tensor))
        return ref is not None and ref() is tensor

    def _count(self, name: str) -> None:
        frames = [f for f in traceback.extract_stack() if "/torch/" not in f.filename and f.filename != __file__]
        where = " < ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}" for f in frames[::-1][:3])
        self.sites[f"{name} <- {where}"] += 1

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        on_device = any(self._resident(t) for t in tensors)
        this = args[0] if args and isinstance(args[0], torch.Tensor) else None
        moved = _target(args[1:], kwargs, self.cpu_run) if name == "to" else (
            "device" if name == "cuda" else None)
        to_host = False
        if this is not None and self._resident(this):
            if name in READS or name in DATA_DEPENDENT:
                self._count(name)
            elif name in ("__getitem__", "__setitem__") and any(
                    t.dtype == torch.bool for t in tree_leaves(args[1]) if isinstance(t, torch.Tensor)):
                self._count(f"{name}[bool mask]")
            elif name == "cpu" or moved == "host":
                to_host = True
                self._copy(f"{name}[download]", this, kwargs)
            elif name == "copy_" and not self._resident(args[1]):
                self._copy("copy_[upload]", this, kwargs, args[2:])
        elif this is not None and moved == "device":
            self._copy(f"{name}[upload]", this, kwargs)
        elif this is not None and name == "copy_" and self._resident(args[1]):
            self._copy("copy_[download]", this, kwargs, args[2:])
        placed = name in FACTORIES and _target((), kwargs, self.cpu_run) == "device"
        out = func(*args, **kwargs)
        if placed and name in COPYING_FACTORIES and out.numel():
            self._count(f"{name}[upload]")  # data from Python: a blocking host-to-device copy
        if to_host:
            if out is this:  # on CPU the copy is the tensor itself: give the host a tensor of its own
                out = out.view(out.shape)
            return out
        if on_device or moved == "device" or placed:
            for tensor in tree_leaves(out):
                if isinstance(tensor, torch.Tensor):
                    self._mark(tensor)
        return out

    def _copy(self, name: str, tensor: torch.Tensor, kwargs: dict, args=()) -> None:
        """A copy between host and device: a sync unless non_blocking (torch's blocking copies
        run cudaMemcpyAsync then cudaStreamSynchronize, in both directions) or empty (no copy)."""
        if not tensor.numel():
            return
        if kwargs.get("non_blocking", args[0] if args else False):
            self.async_copies += 1
        else:
            self._count(name)


def _target(args, kwargs, cpu_run: bool) -> str | None:
    """Where `.to(...)` or a factory puts its result: "host", "device", or None when not said.
    On a CUDA run the devices say it. On a CPU run "cpu" spelled as a string is the host (as code
    that moves results off the device writes it) and a torch.device is the model's device."""
    device = kwargs.get("device")
    for value in args:
        if isinstance(value, (str, torch.device)):
            device = value
        elif isinstance(value, torch.Tensor):
            device = value.device
    if device is None:
        return None
    spelled = isinstance(device, str)
    device = torch.device(device)
    if device.type != "cpu":
        return "device"
    if not cpu_run or spelled:
        return "host"
    return "device"


def counter_for(model, inputs: list[dict]) -> SyncCounter:
    """A SyncCounter that knows the model's tensors and `inputs` live on the device. Use one per
    test: what the cache keeps between forwards (its arena, its pending checks) was made on the
    device by an earlier counted forward, and only the same counter remembers that."""
    resident = list(model.parameters()) + list(model.buffers())
    resident += [v for b in inputs for v in b.values() if isinstance(v, torch.Tensor)]
    return SyncCounter(resident)


def counted(counter: SyncCounter, run) -> collections.Counter:
    """The sync call sites counted while `run()` runs."""
    counter.sites = collections.Counter()
    counter.async_copies = 0
    with counter:
        run()
    return counter.sites


def cuda_syncs(run) -> int:
    """Syncs CUDA itself reports while `run()` runs (warnings of set_sync_debug_mode)."""
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    return sum("synchroniz" in str(w.message) for w in seen)


def batches(family: str, gen: torch.Generator, device: str) -> tuple[dict, dict]:
    """(first, mixed): `first` holds an in-batch repeat (row 3 = row 0); `mixed` repeats first's
    rows 0 and 2 (hits), adds new rows and repeats its row 1 in row 4."""
    first = batch(family, [5, 3, 7, 5, 6], gen)
    mixed = batch(family, [5, 4, 7, 6, 4], gen)
    for name in first:
        first[name][3] = first[name][0]
        mixed[name][0], mixed[name][2] = first[name][0], first[name][2]
        mixed[name][4] = mixed[name][1]
    move = lambda b: {k: v.to(device) for k, v in b.items()}
    return move(first), move(mixed)


def added(model, counter: SyncCounter, inputs: dict, call, device: str) -> tuple[int, str]:
    """(syncs the cached call adds over the same call uncached, a report of both)."""
    def uncached():
        with llmcache.bypass(model):
            call(inputs)

    before = llmcache.stats(model).hits
    plain = counted(counter, uncached)
    assert llmcache.stats(model).hits == before, "bypass served rows"
    cached = counted(counter, lambda: call(inputs))
    # Calls the cached forward makes that the uncached one does not; syncs it saves elsewhere (in
    # the blocks that served rows skip) do not pay for them.
    extra = sum((cached - plain).values())
    head = (f"uncached {sum(plain.values())}, cached {sum(cached.values())} (async copies "
            f"{counter.async_copies}); calls it adds (+) and saves (-):")
    report = [head]
    report += [f"  +{n} {site}" for site, n in (cached - plain).items()]
    report += [f"  -{n} {site}" for site, n in (plain - cached).items()]
    if device == "cuda":
        cuda_extra = cuda_syncs(lambda: call(inputs)) - cuda_syncs(uncached)
        report.append(f"CUDA sync detector: cached adds {cuda_extra}")
        extra = max(extra, cuda_extra)
    return extra, "\n".join(report)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_a_cached_forward_adds_at_most_one_sync(family, device, gen):
    model = tiny_model(family).to(device)
    first, mixed = batches(family, gen, device)
    forward = lambda inputs: model(**inputs)
    counter = counter_for(model, [first, mixed])
    reports, failures = [], []
    with torch.inference_mode():
        forward(first)  # warm-up: transformers' lazy set-up is not the cache's
        llmcache.accelerate(model, padding="masked")
        for case, inputs, served in (("cold", first, 0), ("warm", first, 5), ("mixed", mixed, 2)):
            hits = llmcache.stats(model).hits
            extra, report = added(model, counter, inputs, forward, device)
            # The case ran the paths it names: the rows it serves were served.
            assert llmcache.stats(model).hits - hits == served, (case, llmcache.stats(model))
            reports.append(f"{family} {device} {case}: {report}")
            if extra > ADDED_SYNCS_MAX:
                failures.append(case)
    st = llmcache.stats(model)
    assert st.entries == 4 + 2, st  # first's 4 distinct rows, mixed's 2 new ones
    print("\n".join(reports))
    assert not failures, f"more than {ADDED_SYNCS_MAX} added sync(s) per forward in {failures}:\n" + "\n".join(reports)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", sorted(DECODERS))
def test_generate_adds_at_most_one_sync(family, device, gen):
    """Only generate's prefill is routed (decode steps run as they would): one sync for it, and
    one for the decode steps' tokens when their full pages are written (here once, when generate
    returns: 3 new tokens). Generate itself waits for every step's tokens (15 syncs uncached
    here), so that copy costs a transfer, not a wait."""
    model = tiny_model(family).to(device)
    first, _ = batches(family, gen, device)
    inputs = {k: v for k, v in first.items() if k != "position_ids"}
    generate = lambda inputs: model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
    counter = counter_for(model, [inputs])
    with torch.inference_mode():
        want = generate(inputs)
        llmcache.accelerate(model, padding="masked")
        reports, failures = [], []
        for case in ("cold", "warm"):
            extra, report = added(model, counter, inputs, generate, device)
            reports.append(f"{family} {device} generate {case}: {report}")
            if extra > ADDED_SYNCS_MAX + 1:
                failures.append(case)
        assert torch.equal(generate(inputs), want)
    assert llmcache.stats(model).hits > 0
    print("\n".join(reports))
    assert not failures, f"more than {ADDED_SYNCS_MAX + 1} added sync(s) per generate in {failures}:\n" + "\n".join(reports)


def test_the_counter_sees_a_sync_on_a_device_tensor_and_not_on_the_host():
    """The counter itself: device reads and blocking copies count, host reads and async copies do not."""
    weight = torch.ones(3)
    counter = SyncCounter([weight])
    with counter:
        device_value = weight * 2
        device_value.sum().item()  # a sync
        bool(device_value.any())  # a sync
        device_value[device_value > 1]  # a sync (the mask's true count)
        host = device_value.cpu()  # a sync
        host.numpy()  # on the host already: free
        host.tolist()
        uploaded = torch.from_numpy(host.numpy()).to(weight.device)  # a blocking upload: a sync
        torch.from_numpy(host.numpy()).to(weight.device, non_blocking=True)  # asynchronous
        torch.tensor([1, 2], device=weight.device)  # a blocking upload from Python data
        torch.zeros(2, device=weight.device)  # made on the device: no copy
        device_value.to("cpu", non_blocking=True)  # asynchronous
        uploaded.tolist()  # a sync: it is on the device now
    names = sorted(site.split(" <- ")[0] for site in counter.sites.elements())
    assert names == sorted(["item", "__bool__", "__getitem__[bool mask]", "cpu[download]", "to[upload]",
                            "tensor[upload]", "tolist"]), counter.sites
    assert counter.async_copies == 2
