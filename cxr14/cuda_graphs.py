"""The whole training step as one CUDA graph (CUDA_GRAPHS): captured once, then replayed, so that the host launches
one graph a step instead of some 350 kernels. On a fast GPU train.py's step is bound by those launches (issue 29:
an H200 waited on the host for 99% of a step).

A graph replays fixed memory with fixed arguments, so the step's inputs live in static buffers the batch is
copied into, the loss comes back in a static tensor, and the learning rate, which the schedulers keep as a Python
float in each param group, is handed to AdamW as a device tensor filled from that float when it changes. The
float stays the group's "lr" between steps: schedulers, logging and checkpoints see what they always saw.

Off CUDA the same static-buffer path runs without capture; that is what the CPU tests check.
"""

import contextlib

import torch


def graph_support(device, world_size, dtype):
    """(True, "") where train.py's step can be captured as one CUDA graph, else (False, why)."""
    if device.type != "cuda":
        return False, f"CUDA graphs exist on CUDA GPUs only, not on {device.type}"
    if world_size > 1:
        return False, "not under torchrun: DDP all-reduces gradients from autograd hooks, outside a captured graph"
    if dtype == torch.float16:
        return False, "fp16 loss scaling (GPUs before Ampere) decides on the host whether to skip a step"
    return True, ""


def rate_tensor(value, device):
    """A learning rate as fused AdamW reads it from a tensor: float32 on CUDA (the kernel's type; a float rate rounds
    to it, about 1e-8 relative); on the CPU, where nothing is captured, float64, which its kernel reads as exactly
    as a float, so that the CPU tests compare steps bit for bit."""
    return torch.tensor(value, dtype=torch.float32 if device.type == "cuda" else torch.float64, device=device)


class GraphedStep:
    """`step(*tensors)` -> loss, run on static copies of its tensors (None entries pass as None) with the
    optimizer's learning rates as device tensors; with `capture`, the first call runs eagerly on a side stream (it
    creates AdamW's state and lets cuDNN choose its kernels), the second is captured and replayed, and every later
    one replays. Each call is one real step: none is repeated or skipped. When capture fails, the step says why
    through `log` and runs eagerly from then on. A batch of another shape than the first runs eagerly."""

    def __init__(self, step, optimizer, capture, log=print):
        self.step, self.optimizer, self.capture, self.log = step, optimizer, capture, log
        self.inputs = None  # the static buffers
        self.rates, self.rate_values = None, None  # a rate_tensor per param group, and the floats in them
        self.graph, self.loss = None, None
        self.calls = 0

    def __call__(self, *tensors):
        self._fill_rates()
        if self.inputs is not None and not self._fits(tensors):
            with self._rates_in_groups():
                return self.step(*tensors)
        self._copy_in(tensors)
        self.calls += 1
        if self.graph is not None:
            self.graph.replay()
            return self.loss
        if not self.capture:
            with self._rates_in_groups():
                return self.step(*self.inputs)
        if self.calls == 1:
            return self._warm_up()
        return self._capture_and_replay()

    def _fits(self, tensors):
        return all(
            (static is None) == (tensor is None) and (static is None or static.shape == tensor.shape)
            for static, tensor in zip(self.inputs, tensors)
        )

    def _copy_in(self, tensors):
        if self.inputs is None:
            self.inputs = [None if tensor is None else torch.empty_like(tensor) for tensor in tensors]
        for static, tensor in zip(self.inputs, tensors):
            if static is not None:
                static.copy_(tensor, non_blocking=True)

    def _fill_rates(self):
        """Copy each group's float learning rate into its device tensor, only when it changed (a fill is a launch)."""
        values = [float(group["lr"]) for group in self.optimizer.param_groups]
        if self.rates is None:
            self.rates = [
                rate_tensor(value, group["params"][0].device)
                for value, group in zip(values, self.optimizer.param_groups)
            ]
        elif values != self.rate_values:
            for rate, value in zip(self.rates, values):
                rate.fill_(value)
        self.rate_values = values

    @contextlib.contextmanager
    def _rates_in_groups(self, capturable=False):
        """The device learning rates in the param groups (and capturable set, for a capture) while a step runs; the
        floats and flags back afterwards, whatever happens."""
        groups = self.optimizer.param_groups
        saved = [(group["lr"], group.get("capturable", False)) for group in groups]
        for group, rate in zip(groups, self.rates):
            group["lr"], group["capturable"] = rate, capturable or group.get("capturable", False)
        try:
            yield
        finally:
            for group, (value, flag) in zip(groups, saved):
                group["lr"], group["capturable"] = value, flag

    def _warm_up(self):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), self._rates_in_groups():
            loss = self.step(*self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        return loss

    def _capture_and_replay(self):
        graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)  # the gradients are then made in the graph's own memory
        try:
            with self._rates_in_groups(capturable=True), torch.cuda.graph(graph, capture_error_mode="thread_local"):
                loss = self.step(*self.inputs)
        except RuntimeError as error:  # capture only records: the step has not run yet, so it runs eagerly now
            self.capture = False
            self.log(f"CUDA_GRAPHS: capturing the training step failed ({error}); training on without graphs")
            self.optimizer.zero_grad(set_to_none=True)
            with self._rates_in_groups():
                return self.step(*self.inputs)
        self.graph, self.loss = graph, loss
        self.log("CUDA_GRAPHS: step 2 captured as one CUDA graph; every later step replays it")
        graph.replay()
        return loss
