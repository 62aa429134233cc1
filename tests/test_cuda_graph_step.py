"""The whole-step CUDA graph (fastmae/cuda_graph.py) and the capturable AdamW it needs.

On a CPU: the capturable optimizer (tensor lr per group, same update as the float-lr one), set_lr, and the
clear errors. On a GPU (skipped here): a captured tiny MAE step against the same step run eagerly, new masking
noise on every replay, an lr change reaching the graph, and the error a step with a host read gets.
"""

import copy

import pytest
import torch

from fastmae.cuda_graph import GraphedTrainStep, check_capturable_optimizer
from fastmae.models import create_model
from fastmae.speed import make_optimizer
from fastmae.train.optim import param_groups
from fastmae.train.schedule import set_lr  # the trainer's: a tensor lr is written in place

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
TINY = "mae_vit_tiny_patch4_dec64d2b"


def _grads_for(params, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)


def test_capturable_adamw_holds_a_tensor_lr_per_group_and_updates_like_the_float_one():
    torch.manual_seed(0)
    model = create_model(TINY)
    twin = copy.deepcopy(model)
    model_before = [p.detach().clone() for p in model.parameters()]
    plain = make_optimizer(param_groups(model, 0.05), lr=1e-3, impl="torch-fused")
    graphable = make_optimizer(param_groups(twin, 0.05), lr=1e-3, impl="torch-fused", capturable=True)
    check_capturable_optimizer(graphable)  # no error
    lrs = [g["lr"] for g in graphable.param_groups]
    assert len(lrs) == 2 and all(isinstance(lr, torch.Tensor) and lr.dtype == torch.float32 for lr in lrs)
    assert lrs[0] is not lrs[1]  # each group its own: set_lr may scale them differently
    assert all(g["capturable"] and g["fused"] for g in graphable.param_groups)
    for step in range(4):
        for opt, m in ((plain, model), (graphable, twin)):
            _grads_for(m.parameters(), seed=step)
            opt.step()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        # within fp32 rounding, a few ulps after 4 steps (not bit-identical: the kernel takes a float lr's
        # products in double and a tensor lr's in fp32)
        torch.testing.assert_close(b, a, rtol=4 * 2**-23, atol=1e-9, msg=name)
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), model_before))  # the steps moved them


def test_capturable_adamw_keeps_a_groups_own_lr():
    model = torch.nn.Linear(3, 4)
    opt = make_optimizer([{"params": [model.weight]}, {"params": [model.bias], "lr": 5e-4}], lr=1e-3,
                         impl="torch-fused", capturable=True)
    assert [float(g["lr"]) for g in opt.param_groups] == pytest.approx([1e-3, 5e-4])


def test_capturable_adamw_refuses_an_implementation_torch_cannot_capture(monkeypatch):
    with pytest.raises(ValueError, match="capturable AdamW needs torch's implementation"):
        make_optimizer(torch.nn.Linear(3, 4).parameters(), lr=1e-3, impl="apex", capturable=True)
    # "auto" where it would pick apex (CUDA without torch's fused kernels): torch's foreach, which can be captured
    import fastmae.speed as speed

    monkeypatch.setattr(speed, "choose_adamw_impl", lambda params, impl: "apex")
    opt = speed.make_optimizer(torch.nn.Linear(3, 4).parameters(), lr=1e-3, capturable=True)
    assert opt.defaults["foreach"] and opt.defaults["capturable"]


def test_set_lr_writes_into_the_same_tensor_and_applies_each_groups_scale():
    model = torch.nn.Linear(3, 4)
    opt = make_optimizer([{"params": [model.weight], "lr_scale": 0.5}, {"params": [model.bias]}], lr=1e-3,
                         impl="torch-fused", capturable=True)
    before = [g["lr"] for g in opt.param_groups]
    set_lr(opt, 2e-3)
    assert [g["lr"] for g in opt.param_groups] == before  # the same objects: a captured graph reads their memory
    assert [float(g["lr"]) for g in opt.param_groups] == pytest.approx([1e-3, 2e-3])
    floats = torch.optim.AdamW([{"params": [model.weight], "lr_scale": 0.25}], lr=1e-3)
    set_lr(floats, 4e-3)
    assert floats.param_groups[0]["lr"] == pytest.approx(1e-3)


def test_a_float_lr_or_a_non_capturable_optimizer_is_refused_with_the_fix():
    model = torch.nn.Linear(3, 4)
    with pytest.raises(ValueError, match="capturable=True"):
        check_capturable_optimizer(make_optimizer(model.parameters(), lr=1e-3, impl="torch-fused"))
    frozen = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True, capturable=True)
    with pytest.raises(ValueError, match="tensor lr"):
        check_capturable_optimizer(frozen)


def test_graphed_step_on_cpu_tensors_says_it_needs_cuda():
    model = torch.nn.Linear(3, 4)
    opt = make_optimizer(model.parameters(), lr=1e-3, impl="torch-fused", capturable=True)
    with pytest.raises(ValueError, match="CUDA device"):
        GraphedTrainStep(lambda x: model(x).sum(), opt, [torch.randn(2, 3)])


class _EmulatedGraph:
    """Stands in for torch.cuda.CUDAGraph on a CPU, to check GraphedTrainStep's sequencing (which call runs
    eagerly, which captures, that capture is no optimizer step and each call is one, on its own batch). A real
    capture records kernels without running them; here the body runs, so the capture context puts the weights
    and the optimizer's state back afterwards. A real replay reruns the kernels into the memory of the captured
    outputs; here the body runs again and its outputs are copied into those tensors. Not a test of capture."""

    captures = 0

    def __init__(self):
        self.step = None  # the GraphedTrainStep being captured, set by the test

    def replay(self):
        outputs = self.step.body(*self.step.static_inputs)
        for kept, new in zip(self.step.outputs, outputs):
            kept.copy_(new)


def _emulate_cuda(monkeypatch, model, optimizer, holder: list):
    import contextlib

    import fastmae.cuda_graph as cg

    class Stream:
        def __init__(self, device=None):
            self.device = device

        def wait_stream(self, other):
            pass

    @contextlib.contextmanager
    def graph(g):
        weights = [p.detach().clone() for p in model.parameters()]
        state = {p: {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}
        _EmulatedGraph.captures += 1
        g.step = holder[0]
        yield
        for p, w in zip(model.parameters(), weights):
            p.data.copy_(w)
        for p, saved in state.items():
            for k, v in saved.items():
                optimizer.state[p][k].copy_(v)

    monkeypatch.setattr(cg, "cuda_device_of", lambda tensors: torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _EmulatedGraph)
    monkeypatch.setattr(torch.cuda, "graph", graph)


def test_graphed_step_sequencing_each_call_is_one_step_on_its_batch(monkeypatch):
    """Emulated on the CPU (_EmulatedGraph): 2 eager calls, the 3rd captures and replays once, later calls
    replay; the losses and weights equal a plain loop over the same batches and noise, bit for bit."""
    torch.manual_seed(0)
    model = create_model(TINY)
    twin = copy.deepcopy(model)
    plain_opt = make_optimizer(param_groups(model, 0.05), lr=1e-3, capturable=True)
    graph_opt = make_optimizer(param_groups(twin, 0.05), lr=1e-3, capturable=True)
    plain = _tiny_step(model, plain_opt, with_noise=True)
    holder = []
    _emulate_cuda(monkeypatch, twin, graph_opt, holder)
    _EmulatedGraph.captures = 0
    length = model.patch_embed.num_patches
    graphed = GraphedTrainStep(_tiny_step(twin, graph_opt, with_noise=True), graph_opt,
                               [torch.empty(3, 3, 32, 32), torch.empty(3, length)], eager_steps=2)
    holder.append(graphed)
    gen = torch.Generator().manual_seed(1)
    outputs = []
    for call in range(6):
        batch, noise = torch.randn(3, 3, 32, 32, generator=gen), torch.rand(3, length, generator=gen)
        if call == 4:  # a schedule's change reaches the replays
            set_lr(plain_opt, 3e-3)
            set_lr(graph_opt, 3e-3)
        want, _ = plain(batch, noise)
        got = graphed(batch, noise)
        assert graphed.captured == (call >= 2) and _EmulatedGraph.captures == (call >= 2)
        assert torch.equal(got[0], want), call
        outputs.append(got)
    assert all(o is outputs[2] for o in outputs[3:])  # replays return the captured outputs' memory
    assert graphed.capture_s > 0
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
    assert int(graph_opt.state[next(twin.parameters())]["step"]) == 6  # six calls, six optimizer steps


# ---------------------------------------------------------------------------------------------------- GPU only


def _tiny_step(model, optimizer, with_noise: bool):
    def body(imgs, *noise):
        optimizer.zero_grad(set_to_none=True)
        loss, _, mask = model(imgs, 0.75, noise=noise[0] if with_noise else None)
        loss.backward()
        optimizer.step()
        return loss, mask

    return body


def _cuda_tiny(seed: int = 0):
    torch.manual_seed(seed)
    model = create_model(TINY).cuda().train()
    imgs = torch.randn(6, 3, 32, 32, device="cuda")
    return model, imgs


@cuda
def test_a_captured_step_follows_the_eager_step_given_the_same_batches_and_noise():
    model, imgs = _cuda_tiny()
    twin = copy.deepcopy(model)
    start = [p.detach().clone() for p in model.parameters()]
    eager_opt = make_optimizer(param_groups(model, 0.05), lr=1e-3)
    graph_opt = make_optimizer(param_groups(twin, 0.05), lr=1e-3, capturable=True)
    eager = _tiny_step(model, eager_opt, with_noise=True)
    length = model.patch_embed.num_patches
    graphed = GraphedTrainStep(_tiny_step(twin, graph_opt, with_noise=True), graph_opt,
                               [torch.empty_like(imgs), torch.empty(6, length, device="cuda")], eager_steps=2)
    gen = torch.Generator(device="cuda").manual_seed(1)
    for step in range(7):  # 2 eager, the capture, 4 replays
        batch = imgs + 0.1 * step
        noise = torch.rand(6, length, device="cuda", generator=gen)
        want, _ = eager(batch, noise)
        got, _ = graphed(batch, noise)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=f"step {step}")
    assert graphed.captured
    # How far the weights moved, all together: Adam divides each gradient by its own running size, so where a
    # gradient is at rounding level (an atomic-order difference in an attention backward) one element may move
    # differently; the movement as a whole must agree.
    moved = torch.cat([(a - a0).flatten() for a, a0 in zip(model.parameters(), start)])
    moved_twin = torch.cat([(b - a0).flatten() for b, a0 in zip(twin.parameters(), start)])
    assert moved.norm() > 0 and (moved_twin - moved).norm() <= 1e-3 * moved.norm()


@cuda
def test_every_replay_draws_new_masking_noise_and_sees_lr_changes():
    model, imgs = _cuda_tiny()
    opt = make_optimizer(param_groups(model, 0.05), lr=1e-3, capturable=True)
    graphed = GraphedTrainStep(_tiny_step(model, opt, with_noise=False), opt, [torch.empty_like(imgs)],
                               eager_steps=1)
    for _ in range(2):
        graphed(imgs)
    assert graphed.captured
    masks = [graphed(imgs)[1].clone() for _ in range(3)]
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])
    assert all(int(m.sum()) == m.shape[0] * int(0.75 * m.shape[1]) for m in masks)  # still 75% per image
    set_lr(opt, 0.0)  # AdamW with lr 0 leaves every weight as it is
    before = [p.detach().clone() for p in model.parameters()]
    graphed(imgs)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    set_lr(opt, 1e-3)
    graphed(imgs)
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


@cuda
def test_a_step_that_reads_a_device_value_fails_capture_with_a_clear_error():
    model, imgs = _cuda_tiny()
    opt = make_optimizer(param_groups(model, 0.05), lr=1e-3, capturable=True)
    body = _tiny_step(model, opt, with_noise=False)

    def reads_loss(imgs):
        loss, mask = body(imgs)
        if loss.item() > 1e9:  # a host read: the capture cannot record it
            raise AssertionError("unreachable")
        return loss

    graphed = GraphedTrainStep(reads_loss, opt, [torch.empty_like(imgs)], eager_steps=1)
    graphed(imgs)
    with pytest.raises(RuntimeError, match="could not be captured"):
        graphed(imgs)


@cuda
def test_a_batch_of_another_shape_is_refused():
    model, imgs = _cuda_tiny()
    opt = make_optimizer(param_groups(model, 0.05), lr=1e-3, capturable=True)
    graphed = GraphedTrainStep(_tiny_step(model, opt, with_noise=False), opt, [torch.empty_like(imgs)])
    with pytest.raises(ValueError, match="partial batch"):
        graphed(imgs[:4])
