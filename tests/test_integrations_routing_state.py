"""Routing and AdapterDrop state belongs to the call: nested route_adapters blocks, two threads on one
model, AdapterDrop as a setting of the model, and index checks before any wrong output. References:
the same model run one adapter at a time (one forward per row), single-threaded."""
import threading

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers not installed (it is in the test extra)")

import adapterkern as ak  # noqa: E402
from adapterkern.integrations.compose import StochasticAdapterDrop, multi_task_forward, route_adapters, set_adapter_drop  # noqa: E402
from adapterkern.integrations.slots import iter_slots  # noqa: E402
from adapterkern.integrations.transformers import adapter_modules  # noqa: E402

from conftest import rel_err  # noqa: E402
from test_integrations_compose import NAMES, model_with_adapters, one_at_a_time  # noqa: E402
from test_integrations_transformers import randomize, run, tiny_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def slot_state(model):
    """Everything a routing context could leave behind: each slot's active entry and drop flag, the
    model's active adapter, the hooks of every module."""
    return (
        [(n, slot.active, slot.dropped) for n, _, slot in iter_slots(model)],
        ak.get_active_adapter(model),
        [(n, len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()],
    )


def routed_reference(model, ids, index):
    return one_at_a_time(model, ids, [NAMES[i] if i >= 0 else None for i in index.tolist()])


def test_nested_route_blocks_restore_the_outer_routing():
    model = model_with_adapters("llama")
    ids = torch.randint(0, 97, (4, 6))
    outer, inner = torch.tensor([2, 0, 1, -1]), torch.tensor([0, 0, 2, 1])
    expected_outer, expected_inner = routed_reference(model, ids, outer), routed_reference(model, ids, inner)
    ak.set_active_adapter(model, "b")
    before = slot_state(model)
    with route_adapters(model, NAMES, outer):
        assert rel_err(run(model, ids), expected_outer) < 1e-5
        with route_adapters(model, NAMES, inner):
            assert rel_err(run(model, ids), expected_inner) < 1e-5
        assert rel_err(run(model, ids), expected_outer) < 1e-5  # the outer routing again, not plain "b"
        with pytest.raises(RuntimeError, match="body"):
            with route_adapters(model, NAMES, inner):
                raise RuntimeError("body")
        assert rel_err(run(model, ids), expected_outer) < 1e-5
    assert slot_state(model) == before


def test_route_block_restores_exactly_the_slots_it_found():
    """Slots set by hand (one place switched off) are found the same after the block, the body raising or not."""
    model = model_with_adapters("bert")
    ak.set_active_adapter(model, "a")
    first = next(slot for _, _, slot in iter_slots(model))
    first.active = None
    before = slot_state(model)
    with route_adapters(model, NAMES, torch.tensor([0, 1])):
        run(model, torch.randint(0, 97, (2, 5)))
    assert slot_state(model) == before
    with pytest.raises(KeyError):
        with route_adapters(model, NAMES, torch.tensor([0, 1])):
            raise KeyError("body")
    assert slot_state(model) == before


def in_overlapping_threads(model, layer, jobs):
    """Run each job in its own thread; every forward waits inside the model (before ``layer``) until all
    are there, so the forwards overlap. Returns the jobs' results in order."""
    barrier = threading.Barrier(len(jobs), timeout=120)

    def meet(module, args):
        barrier.wait()

    handle = layer.register_forward_pre_hook(meet)
    results, errors = [None] * len(jobs), []

    def work(i, job):
        try:
            results[i] = job()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=work, args=(i, job)) for i, job in enumerate(jobs)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
    finally:
        handle.remove()
    assert not any(t.is_alive() for t in threads)
    if errors:
        raise errors[0]
    return results


def test_two_threads_route_one_model_independently():
    model = model_with_adapters("llama")
    ids = torch.randint(0, 97, (3, 6))
    index_a, index_b = torch.tensor([0, 1, 2]), torch.tensor([2, -1, 0])
    expected_a, expected_b = routed_reference(model, ids, index_a), routed_reference(model, ids, index_b)
    expected_plain = one_at_a_time(model, ids, ["b"] * 3)  # a thread without a block: the active adapter
    ak.set_active_adapter(model, "b")
    before = slot_state(model)

    def routed(index):
        def job():
            with route_adapters(model, NAMES, index):
                return run(model, ids)
        return job

    out_a, out_b, plain = in_overlapping_threads(model, model.layers[1], [routed(index_a), routed(index_b), lambda: run(model, ids)])
    assert rel_err(out_a, expected_a) < 1e-5
    assert rel_err(out_b, expected_b) < 1e-5
    assert rel_err(plain, expected_plain) < 1e-5
    assert slot_state(model) == before


def test_multi_task_forward_beside_another_thread():
    """One thread's multi_task_forward (tiling hooks, its own AdapterDrop) leaves another thread's
    forward, on the same model at the same time, as it would be alone."""
    model = model_with_adapters("llama")
    ids = torch.randint(0, 97, (2, 6))
    index = torch.tensor([1, 2])
    expected_multi = []
    set_adapter_drop(model, 1)
    for name in NAMES:
        ak.set_active_adapter(model, name)
        expected_multi.append(run(model, ids))
    set_adapter_drop(model, 0)
    expected_routed = routed_reference(model, ids, index)
    ak.set_active_adapter(model, "a")
    before = slot_state(model)

    def multi():
        return multi_task_forward(model, NAMES, drop_layers=1, input_ids=ids).last_hidden_state

    def routed():
        with route_adapters(model, NAMES, index):
            return run(model, ids)

    out_multi, out_routed = in_overlapping_threads(model, model.layers[2], [multi, routed])
    assert out_multi.shape[0] == 3 * 2
    for i in range(3):
        assert rel_err(out_multi[2 * i : 2 * i + 2], expected_multi[i]) < 1e-5, NAMES[i]
    assert rel_err(out_routed, expected_routed) < 1e-5
    assert slot_state(model) == before


def test_two_threads_in_multi_task_forward():
    """Each thread's forward passes through the other call's tiling hooks untouched."""
    model = model_with_adapters("bert")
    ids = torch.randint(0, 97, (2, 6))
    jobs = {"x": (["a", "b", "c"], 1), "y": (["c", None], 0)}
    expected = {}
    for key, (names, drop) in jobs.items():
        set_adapter_drop(model, drop)
        expected[key] = torch.cat([one_at_a_time(model, ids, [name] * 2) for name in names])
    set_adapter_drop(model, 0)
    ak.set_active_adapter(model, "a")
    before = slot_state(model)

    def multi(names, drop):
        return lambda: multi_task_forward(model, names, drop_layers=drop, input_ids=ids).logits

    outs = in_overlapping_threads(model, model.bert.encoder.layer[2], [multi(*jobs["x"]), multi(*jobs["y"])])
    for key, out in zip(jobs, outs):
        assert rel_err(out, expected[key]) < 1e-5, key
    assert slot_state(model) == before


def test_adapter_drop_applies_to_adapters_added_later():
    model = tiny_model("llama")
    set_adapter_drop(model, 1)
    ak.add_adapter(model, "a", ak.AdapterConfig.houlsby(bottleneck_size=4))
    randomize(model, "a")
    ids = torch.randint(0, 97, (2, 7))
    dropped = run(model, ids)
    # the same weights placed with leave_out=[0]: what dropping layer 0 means
    other = tiny_model("llama")
    other.load_state_dict({k: v for k, v in model.state_dict().items() if "bottleneck_adapters" not in k}, strict=False)
    ak.add_adapter(other, "a", ak.AdapterConfig.houlsby(bottleneck_size=4, leave_out=[0]))
    src = adapter_modules(model, "a")
    for place, adapter in adapter_modules(other, "a").items():
        adapter.load_state_dict(src[place].state_dict())
    assert torch.equal(dropped, run(other, ids))
    assert [slot.dropped for _, _, slot in iter_slots(model)] == [True, True, False, False, False, False]
    # a fresh place after deleting everything follows the setting too; 0 switches every place back on
    ak.delete_adapter(model, "a")
    ak.add_adapter(model, "b", ak.AdapterConfig.pfeiffer(bottleneck_size=4))
    assert [slot.dropped for _, _, slot in iter_slots(model)] == [True, False, False]
    set_adapter_drop(model, 0)
    assert not any(slot.dropped for _, _, slot in iter_slots(model))


def test_adapter_drop_needs_a_model():
    with pytest.raises(TypeError, match="model"):
        set_adapter_drop("llama", 1)
    with pytest.raises(TypeError, match="model"):
        StochasticAdapterDrop(["not", "a", "model"])


@pytest.mark.parametrize(
    "index, exc",
    [
        (torch.tensor([True, False]), TypeError),
        (torch.tensor([0, 1], dtype=torch.complex64), TypeError),
        (torch.tensor([0.0, 1.0]), TypeError),
        ([0, 1], TypeError),
        (torch.zeros(2, 5, 1, dtype=torch.long), TypeError),
    ],
)
def test_route_refuses_non_integer_indices(index, exc):
    model = model_with_adapters("bert")
    before = slot_state(model)
    with pytest.raises(exc, match="adapter_index"):
        with route_adapters(model, NAMES, index):
            pass
    assert slot_state(model) == before


@pytest.mark.parametrize("index", [torch.tensor([1]), torch.tensor([0, 1, 2]), torch.zeros(4, 3, dtype=torch.long)])
def test_route_refuses_an_index_that_does_not_fit_the_batch(index):
    """A (B,) index of another length (one entry would broadcast over the batch) or a (B, L) index of
    another shape is a ValueError naming adapter_index before any output."""
    model = model_with_adapters("gpt2")
    ids = torch.randint(0, 97, (4, 5))
    with route_adapters(model, NAMES, index):
        with pytest.raises(ValueError, match="adapter_index"):
            run(model, ids)
