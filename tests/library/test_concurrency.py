"""One model shared by threads (a web server's workers): every row gets exactly the output it gets alone."""

import threading
from functools import partial

import pytest
import torch
from peft import get_peft_model

from peft_recast import RecastConfig
from peft_recast.layer import RecastLayer
from peft_recast.model import _adapter_names_pre_forward_hook

from ..models import tiny_bert

THREADS, CALLS = 8, 1000


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread per call, as a server with one worker per core runs: 8 Python threads each starting
    torch's own pool only measure the scheduler."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _served_model():
    model = get_peft_model(tiny_bert(layers=2), RecastConfig(init_weights=False), adapter_name="a0")
    for i in range(1, 4):
        model.add_adapter(f"a{i}", RecastConfig(init_weights=False))
    return model.eval()


def _run(workers) -> list[str]:
    """Start every worker at once (a barrier), join them, and return what went wrong."""
    problems: list[str] = []
    barrier = threading.Barrier(len(workers))

    def wrapped(work):
        barrier.wait()
        try:
            work(problems)
        except Exception as error:  # a crash in a worker is a failure of the test, not of the thread
            problems.append(f"{type(error).__name__}: {error}")

    threads = [threading.Thread(target=wrapped, args=(work,)) for work in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return problems


@torch.no_grad()
def test_threads_mixing_adapters_per_row_each_get_their_own_rows():
    model = _served_model()
    ids = torch.randint(0, 99, (4, 6), generator=torch.Generator().manual_seed(0))
    mixes = [["a0", "a1", "a2", "a3"], ["a3", "a2", "a1", "a0"], ["a1", "a1", "__base__", "a2"],
             ["a2", "a0", "a3", "a3"]]
    alone = [model(input_ids=ids, adapter_names=mix).last_hidden_state for mix in mixes]
    for mix, expected in zip(mixes, alone):  # each row as its adapter computes it on its own
        for row, name in enumerate(mix):
            if name != "__base__":
                model.set_adapter(name)
                torch.testing.assert_close(model(input_ids=ids[row : row + 1]).last_hidden_state[0], expected[row],
                                           atol=1e-6, rtol=1e-6)

    def worker(thread):
        def work(problems):
            for call in range(CALLS):
                mix = (thread + call) % len(mixes)
                if not torch.equal(model(input_ids=ids, adapter_names=mixes[mix]).last_hidden_state, alone[mix]):
                    problems.append(f"thread {thread} call {call}: rows of another mix")

        return work

    problems = _run([worker(thread) for thread in range(THREADS)])
    assert problems == [], problems[:3]


@torch.no_grad()
def test_a_hook_another_thread_is_still_registering_leaves_a_mixed_call_alone():
    """PyTorch stores a pre-hook before its with-kwargs flag: a forward in that moment calls it with ``(module,
    args)`` only. Here that moment is frozen on every RECAST layer while a mixed call runs."""
    model = _served_model()
    ids = torch.randint(0, 99, (2, 5), generator=torch.Generator().manual_seed(2))
    mix = ["a1", "__base__"]
    expected = model(input_ids=ids, adapter_names=mix).last_hidden_state
    layers = [module for module in model.modules() if isinstance(module, RecastLayer)]
    handles = [layer.register_forward_pre_hook(partial(_adapter_names_pre_forward_hook, in_encoder=False))
               for layer in layers]  # stored, not yet flagged as taking kwargs
    try:
        assert torch.equal(model(input_ids=ids, adapter_names=mix).last_hidden_state, expected)
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def test_per_call_adapter_names_are_safe_while_another_thread_switches_the_active_adapter():
    """``adapter_names`` per call never reads the active adapter; threads on the cached single-adapter path with one
    active adapter share one cached weight per layer and get the right output too."""
    model = _served_model()
    ids = torch.randint(0, 99, (2, 5), generator=torch.Generator().manual_seed(1))
    names = ["a0", "a1", "a2", "a3"]
    alone = {name: model(input_ids=ids, adapter_names=[name, name]).last_hidden_state for name in names}
    stop, running, lock = threading.Event(), [THREADS - 1], threading.Lock()

    def switcher(problems):
        step = 0
        while not stop.wait(0.0005):  # a switch every half millisecond, leaving the GIL to the callers between
            model.set_adapter(names[step % len(names)])
            step += 1
        assert step > 0

    def per_call(thread):
        def work(problems):
            try:
                for call in range(CALLS // 4):
                    name = names[(thread + call) % len(names)]
                    out = model(input_ids=ids, adapter_names=[name, name]).last_hidden_state
                    if not torch.equal(out, alone[name]):
                        problems.append(f"thread {thread}: another adapter's output for {name}")
            finally:  # the last caller to finish stops the switcher, whatever happened
                with lock:
                    running[0] -= 1
                    if running[0] == 0:
                        stop.set()

        return work

    problems = _run([switcher, *[per_call(thread) for thread in range(THREADS - 1)]])
    assert problems == [], problems[:3]

    model.set_adapter("a2")  # no switching: the cached path, shared by every thread
    cached_alone = model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(cached_alone, alone["a2"], atol=1e-6, rtol=1e-6)

    def cached(problems):
        for _ in range(CALLS // 4):
            if not torch.equal(model(input_ids=ids).last_hidden_state, cached_alone):
                problems.append("cached path: another output")

    assert _run([cached] * THREADS) == []
