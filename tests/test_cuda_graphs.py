"""cuda_graphs.py on a CPU: where graphs are refused and why, and the static-buffer step (the path a captured graph
replays) against plain eager steps. The capture itself needs a GPU: gpu_check.py's cuda_graphs and graphed lines."""

import contextlib
import copy

import pytest
import torch

from cxr14 import cuda_graphs
from cxr14.cuda_graphs import GraphedStep, graph_support
from cxr14.loop import Loop, graphed_step


@pytest.mark.parametrize(
    ("device", "world_size", "dtype", "why"),
    [
        ("cpu", 1, torch.bfloat16, "CUDA GPUs only, not on cpu"),
        ("mps", 1, None, "CUDA GPUs only, not on mps"),
        ("cuda", 2, torch.bfloat16, "torchrun"),
        ("cuda", 1, torch.float16, "fp16 loss scaling"),
    ],
)
def test_graphs_are_refused_saying_why(device, world_size, dtype, why):
    possible, said = graph_support(torch.device(device), world_size, dtype)
    assert not possible and why in said


def test_graphs_are_allowed_on_one_cuda_gpu_in_bf16_or_fp32():
    assert graph_support(torch.device("cuda:1"), 1, torch.bfloat16) == (True, "")
    assert graph_support(torch.device("cuda"), 1, None) == (True, "")


def test_a_run_asking_for_graphs_where_there_are_none_says_why_and_steps_eagerly():
    said = []
    loop = Loop(torch.device("cpu"), torch.bfloat16)
    assert graphed_step(True, None, None, loop, said.append) is None
    assert said == ["CUDA_GRAPHS: CUDA graphs exist on CUDA GPUs only, not on cpu; training without graphs"]
    assert graphed_step(False, None, None, loop, said.append) is None and len(said) == 1  # not asked: silent


def small_training(seed=0):
    """A small net with dropout, fused AdamW (as train.py's) and a per-step schedule whose rate changes each step."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Dropout(0.5), torch.nn.Linear(16, 3))
    optimizer = torch.optim.AdamW(net.parameters(), lr=2**-6, weight_decay=0.125, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5**step)
    return net, optimizer, scheduler


def make_step(net, optimizer, seen=None):
    def step(inputs, scale, targets):
        if seen is not None:
            seen.append((inputs, inputs.clone(), type(optimizer.param_groups[0]["lr"])))
        logits = net(inputs if scale is None else inputs * scale)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    return step


def batches(count, size=4):
    generator = torch.Generator().manual_seed(1)
    return [
        (torch.randn(size, 6, generator=generator), None, (torch.rand(size, 3, generator=generator) > 0.5).float())
        for _ in range(count)
    ]


def test_the_static_buffer_step_trains_exactly_as_eager_steps_under_a_changing_learning_rate():
    net, optimizer, scheduler = small_training()
    eager_net, eager_optimizer, eager_scheduler = small_training()
    seen = []
    graphed = GraphedStep(make_step(net, optimizer, seen), optimizer, capture=False)
    eager = make_step(eager_net, eager_optimizer)
    for number, (inputs, scale, targets) in enumerate(batches(5)):
        torch.manual_seed(number)  # the same dropout masks for both
        loss = graphed(inputs, scale, targets)
        torch.manual_seed(number)
        assert torch.equal(loss, eager(inputs, scale, targets))
        scheduler.step()
        eager_scheduler.step()
        assert type(optimizer.param_groups[0]["lr"]) is float  # a float between steps: schedulers and checkpoints
        assert torch.equal(seen[-1][1], inputs)  # the step saw this batch's values...
    assert all(buffer is seen[0][0] for buffer, *_ in seen)  # ...in the one static buffer
    assert {rate_type for *_, rate_type in seen} == {torch.Tensor}  # and the learning rate as a tensor
    assert graphed.rates[0].item() == 2**-6 * 0.5**4  # the fifth step's rate
    for mine, theirs in zip(net.parameters(), eager_net.parameters()):
        assert torch.equal(mine, theirs)
    assert not optimizer.param_groups[0]["capturable"]  # checkpoints keep what they had


def test_a_batch_of_another_shape_runs_on_its_own_tensors_and_the_buffers_stay():
    net, optimizer, _ = small_training()
    seen = []
    graphed = GraphedStep(make_step(net, optimizer, seen), optimizer, capture=False)
    full, short = batches(1)[0], batches(1, size=3)[0]
    graphed(*full)
    graphed(*short)
    assert seen[1][0] is short[0] and graphed.inputs[0].shape == (4, 6)
    graphed(*full)
    assert seen[2][0] is seen[0][0]


@contextlib.contextmanager
def fake_cuda(monkeypatch, capturing):
    """torch.cuda's streams and graph capture as no-ops on a CPU; inside `graph`, capturing[0] is True."""

    class Stream:
        def wait_stream(self, other):
            pass

    @contextlib.contextmanager
    def graph(cuda_graph, capture_error_mode):
        capturing[0] = True
        try:
            yield
        finally:
            capturing[0] = False

    cuda = cuda_graphs.torch.cuda
    monkeypatch.setattr(cuda, "Stream", Stream)
    monkeypatch.setattr(cuda, "current_stream", Stream)
    monkeypatch.setattr(cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(cuda, "CUDAGraph", object)
    monkeypatch.setattr(cuda, "graph", graph)
    yield


def test_a_capture_that_fails_says_why_and_trains_on_eagerly_losing_no_step(monkeypatch):
    """The capture of step 2 fails as an operation a graph cannot hold would (it raises while capturing); that step
    and every later one run eagerly, once each, and the run equals eager steps throughout."""
    capturing, flags, said = [False], [], []
    net, optimizer, _ = small_training()
    eager_net, eager_optimizer, _ = small_training()
    step = make_step(net, optimizer)

    def step_refused_in_capture(*tensors):
        flags.append(optimizer.param_groups[0]["capturable"])
        if capturing[0]:
            raise RuntimeError("operation not permitted when stream is capturing")
        return step(*tensors)

    with fake_cuda(monkeypatch, capturing):
        graphed = GraphedStep(step_refused_in_capture, optimizer, capture=True, log=said.append)
        eager = make_step(eager_net, eager_optimizer)
        for number, batch in enumerate(batches(4)):
            torch.manual_seed(number)
            loss = graphed(*batch)
            torch.manual_seed(number)
            assert torch.equal(loss, eager(*batch)), number
    assert flags == [False, True, False, False, False]  # warm-up, the capture, its eager redo, two eager steps
    assert len(said) == 1 and "capturing the training step failed (operation not permitted" in said[0]
    assert "training on without graphs" in said[0] and not optimizer.param_groups[0]["capturable"]
    assert graphed.graph is None and not graphed.capture
    for mine, theirs in zip(net.parameters(), eager_net.parameters()):
        assert torch.equal(mine, theirs)


@pytest.mark.slow  # torch.compile on the CPU: tens of seconds
def test_the_static_buffer_step_of_a_compiled_net_matches_eager_steps():
    net, optimizer, _ = small_training()
    eager_net, eager_optimizer = copy.deepcopy(net), None
    eager_optimizer = torch.optim.AdamW(eager_net.parameters(), lr=2**-6, weight_decay=0.125, fused=True)
    net.eval(), eager_net.eval()  # no dropout: the compiled net's random numbers are its own
    graphed = GraphedStep(make_step(torch.compile(net), optimizer), optimizer, capture=False)
    eager = make_step(eager_net, eager_optimizer)
    for batch in batches(4):
        torch.testing.assert_close(graphed(*batch), eager(*batch), rtol=1e-5, atol=1e-6)
    for mine, theirs in zip(net.parameters(), eager_net.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
