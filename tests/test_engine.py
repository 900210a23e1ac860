"""Tests of lagnet.engine: the training step, the epoch loop and evaluation."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lagnet import LAGNet, LAGNetLoss, LAGNetOutput, build_lagnet
from lagnet.engine import (
    NonFiniteLossError,
    StepResult,
    TrainStep,
    default_amp,
    evaluate,
    train_one_epoch,
)
from lagnet.evaluation import evaluate_features, extract_features

LABELS = torch.tensor([0, 0, 1, 1])


def small(variant: str = "paper") -> LAGNet:
    torch.manual_seed(0)
    return build_lagnet(5, backbone="resnet18", variant=variant, num_attentions=4).train()


def images(seed: int, n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, 64, 32, generator=torch.Generator().manual_seed(seed))


def make_step(
    model: LAGNet | None = None, *, lr: float = 1e-4, **kwargs: Any
) -> tuple[LAGNet, LAGNetLoss, TrainStep]:
    model = small() if model is None else model
    criterion = LAGNetLoss(5, model.attention_dim)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    return model, criterion, TrainStep(model, criterion, optimizer, **kwargs)


def test_default_amp_on_this_machine() -> None:
    assert default_amp("cpu") is None
    assert default_amp(torch.device("cpu")) is None
    if not torch.cuda.is_available():
        assert default_amp("cuda") is None


@pytest.mark.parametrize(
    ("capability", "expected"), [((7, 5), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")]
)
def test_default_amp_follows_the_gpu_generation(
    monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int], expected: str
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert default_amp("cuda:0") == expected
    assert default_amp("cpu") is None


def test_step_is_forward_loss_zero_grad_backward_step() -> None:
    model, criterion, step = make_step(lr=0.0)
    twin, twin_criterion = copy.deepcopy(model), copy.deepcopy(criterion)
    for p in model.parameters():  # stale gradients must be dropped, not accumulated
        p.grad = torch.full_like(p, 1000.0)
    torch.manual_seed(3)
    result = step(images(1), LABELS)
    torch.manual_seed(3)
    total, parts = twin_criterion(twin.forward_train(images(1)), LABELS)
    total.backward()
    assert isinstance(result, StepResult)
    assert not result.loss.requires_grad and result.loss.dtype == torch.float32
    torch.testing.assert_close(result.loss, total.detach())
    assert set(result.components) == {"cross_entropy", "triplet", "center"}
    for name, value in parts.items():
        torch.testing.assert_close(result.components[name], value.detach())
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        if q.grad is None:
            assert p.grad is None, name
        else:
            torch.testing.assert_close(p.grad, q.grad, msg=name)
    torch.testing.assert_close(criterion.center.centers, twin_criterion.center.centers)


def test_step_updates_the_parameters() -> None:
    model, _, step = make_step(lr=0.1)
    before = model.las.conv.weight.detach().clone()
    grad_free = copy.deepcopy(model)
    step(images(1), LABELS)
    assert model.las.conv.weight.grad is not None
    torch.testing.assert_close(model.las.conv.weight, before - 0.1 * model.las.conv.weight.grad)
    assert not torch.equal(model.stem[0].weight, grad_free.stem[0].weight)


def test_channels_last_converts_model_and_images() -> None:
    model, _, step = make_step(channels_last=True)
    assert model.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
    seen: list[bool] = []
    model.stem.register_forward_pre_hook(
        lambda m, a: seen.append(a[0].is_contiguous(memory_format=torch.channels_last))
    )
    result = step(images(1), LABELS)
    assert seen == [True] and torch.isfinite(result.loss)


@pytest.mark.parametrize(("amp", "dtype"), [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_cpu_mixed_precision_whole_model_step(amp: str, dtype: torch.dtype) -> None:
    model, _, step = make_step(amp=amp, channels_last=True)  # type: ignore[arg-type]
    seen: list[torch.dtype] = []
    model.las.register_forward_hook(lambda m, a, out: seen.append(out.attention_maps.dtype))
    before = model.las.conv.weight.detach().clone()
    if step.scaler is not None:  # the default 2**16 overflows float16 here: a skipped step
        step.load_state_dict({"scaler": {**step.scaler.state_dict(), "scale": 256.0}})
    result = step(images(1), LABELS)
    assert seen == [dtype]  # the model ran under autocast...
    assert result.loss.dtype == torch.float32  # ...the losses in float32
    assert torch.isfinite(result.loss)
    assert all(torch.isfinite(v) for v in result.components.values())
    grad = model.las.conv.weight.grad
    assert grad is not None and grad.dtype == torch.float32 and torch.isfinite(grad).all()
    assert not torch.equal(model.las.conv.weight, before)
    assert (step.scaler is not None) == (amp == "fp16")


def test_scaler_state_round_trip() -> None:
    _, _, fp16 = make_step(amp="fp16")
    assert fp16.scaler is not None
    assert fp16.state_dict()["scaler"]["scale"] == 2.0**16
    fp16.scaler.load_state_dict({**fp16.scaler.state_dict(), "scale": 1024.0})
    state = fp16.state_dict()
    assert set(state) == {"scaler"} and state["scaler"]["scale"] == 1024.0
    _, _, again = make_step(amp="fp16")
    again.load_state_dict(state)
    assert again.scaler is not None and again.scaler.get_scale() == 1024.0
    _, _, bf16 = make_step(amp="bf16")
    assert bf16.scaler is None and bf16.state_dict() == {}
    bf16.load_state_dict(state)  # an fp16 run resumed in bf16: the scaler state is not needed
    with pytest.raises(ValueError, match=r"unexpected keys in the TrainStep state: \['scale'\]"):
        bf16.load_state_dict({"scale": 1.0})
    with pytest.raises(TypeError, match="state must be a dict, got list"):
        bf16.load_state_dict([])  # type: ignore[arg-type]


def test_bad_arguments() -> None:
    model = small()
    criterion = LAGNetLoss(5, model.attention_dim)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(
        ValueError, match=r"amp must be one of \('bf16', 'fp16'\) or None, got 'fp32'"
    ):
        TrainStep(model, criterion, optimizer, amp="fp32")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="criterion must be a LAGNetLoss, got CrossEntropyLoss"):
        TrainStep(model, nn.CrossEntropyLoss(), optimizer)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer, got list"):
        TrainStep(model, criterion, [])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got str"):
        TrainStep("model", criterion, optimizer)  # type: ignore[arg-type]
    step = TrainStep(model, criterion, optimizer)
    with pytest.raises(TypeError, match="images and labels must be tensors, got Tensor and list"):
        step(images(1), [0, 0, 1, 1])  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [[0, 0, 1, 5], [0, -1, 1, 1], [-100, 0, 1, 1]])
def test_out_of_range_labels_stop_the_step_before_any_update(bad: list[int]) -> None:
    model, criterion, step = make_step(lr=0.1)
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"labels must be class indices in \[0, 5\)"):
        step(images(1), torch.tensor(bad))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert criterion.center.centers.abs().sum() == 0


def test_model_in_eval_mode_is_a_clear_error() -> None:
    class EvalOnly(nn.Module):
        def __init__(self, inner: LAGNet) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner.embed(x)

    inner = small()
    step = TrainStep(
        EvalOnly(inner),
        LAGNetLoss(5, inner.attention_dim),
        torch.optim.SGD(inner.parameters(), lr=0.1),
    )
    with pytest.raises(TypeError, match="must return a LAGNetOutput in training mode, got Tensor"):
        step(images(1), LABELS)


def test_wrapped_model_forward_is_used() -> None:
    class Wrapper(nn.Module):  # like DistributedDataParallel: forward, no forward_train
        def __init__(self, inner: LAGNet) -> None:
            super().__init__()
            self.module = inner
            self.calls = 0

        def forward(self, x: torch.Tensor) -> LAGNetOutput:
            self.calls += 1
            return self.module.forward_train(x)

    wrapper = Wrapper(small())
    step = TrainStep(
        wrapper,
        LAGNetLoss(5, wrapper.module.attention_dim),
        torch.optim.SGD(wrapper.parameters(), lr=0.1),
    )
    assert torch.isfinite(step(images(1), LABELS).loss) and wrapper.calls == 1


@pytest.mark.parametrize("variant", ["paper", "reference"])
def test_forward_and_loss_trace_as_one_graph(variant: str) -> None:
    _, _, step = make_step(small(variant))
    explanation = torch._dynamo.explain(step._forward_loss)(images(1), LABELS)
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
    assert explanation.graph_count == 1


def test_compiled_step_matches_eager_over_three_steps() -> None:
    # aot_eager: dynamo's full graph and AOTAutograd's joint forward/backward graph, run by
    # eager kernels (inductor's code generation takes minutes on a small CPU; its random
    # numbers also differ from eager ones, so the drop block would draw other maps)
    results = []
    for compile in (False, True):
        model, criterion, step = make_step(
            compile=compile, compile_options={"backend": "aot_eager"}
        )
        losses = []
        for i in range(3):
            torch.manual_seed(10 + i)
            losses.append(step(images(i), LABELS).loss)
        results.append((torch.stack(losses), model.state_dict(), criterion.state_dict()))
    (eager, eager_model, eager_loss), (compiled, compiled_model, compiled_loss) = results
    assert not torch.equal(eager[0], eager[2])  # it trained
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    for name, value in eager_model.items():
        torch.testing.assert_close(compiled_model[name], value, rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(compiled_loss["center.centers"], eager_loss["center.centers"])


def test_compile_settings_use_cuda_graphs_on_cuda_only() -> None:
    from lagnet.engine import _compile_settings

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert _compile_settings(cpu) == {"fullgraph": True, "dynamic": False}
    assert _compile_settings(cuda) == {
        "fullgraph": True, "dynamic": False, "mode": "reduce-overhead"
    }  # fmt: skip
    # DDP splits the graph at its buckets: no full graph, no CUDA graphs by default
    assert _compile_settings(cuda, ddp=True) == {"fullgraph": False, "dynamic": False}
    # the caller's choice wins, and any mode, options or backend turns the default off
    assert _compile_settings(cuda, options={"mode": "default"})["mode"] == "default"
    assert "mode" not in _compile_settings(cuda, options={"backend": "aot_eager"})
    assert "mode" not in _compile_settings(cuda, options={"options": {"max_autotune": True}})
    assert _compile_settings(cpu, options={"dynamic": True})["dynamic"] is True
    _, _, step = make_step(compile=True, compile_options={"backend": "aot_eager"})
    assert step.compile_options == {"fullgraph": True, "dynamic": False, "backend": "aot_eager"}
    assert step.cuda_graphs is False
    _, _, eager = make_step()
    assert eager.compile_options == {} and eager.cuda_graphs is False


def loader_of(batches: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    return [(x, LABELS, torch.zeros(4, dtype=torch.long)) for x in batches]


def test_train_one_epoch_means_match_the_steps() -> None:
    batches = [images(i) for i in range(3)]
    model, _, step = make_step(lr=1e-3)
    model.eval()
    twin_model, _, twin = make_step(copy.deepcopy(model), lr=1e-3)
    torch.manual_seed(5)
    means = train_one_epoch(step, loader_of(batches), epoch=2, log_every=2, progress=False)
    assert model.training and step.criterion.training
    torch.manual_seed(5)
    twin_model.train()
    results = [twin(x, LABELS) for x in batches]
    assert set(means) == {"loss", "cross_entropy", "triplet", "center"}
    assert means["loss"] == pytest.approx(sum(r.loss.item() for r in results) / 3, rel=1e-6)
    for key in ("cross_entropy", "triplet", "center"):
        want = sum(r.components[key].item() for r in results) / 3
        assert means[key] == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("frozen", [True, False])
def test_non_finite_loss_names_the_exact_batch_at_the_next_read_back(frozen: bool) -> None:
    batches = [images(i) for i in range(6)]
    consumed: list[int] = []

    def loader() -> Iterator[Any]:
        for i, batch in enumerate(loader_of(batches)):
            consumed.append(i)
            yield batch

    model, criterion, step = make_step()
    if frozen:  # the NaN gradients never reach the weights: later steps run normally

        class Frozen(torch.optim.SGD):  # owns the weights (TrainStep checks) but never steps
            def step(self, closure: Any = None) -> None:
                return None

        step = TrainStep(model, criterion, Frozen(model.parameters(), lr=0.1))
    calls = []

    def poison(module: nn.Module, args: Any, out: Any) -> Any:
        calls.append(1)  # the global head's logits become NaN in the third batch only
        return out._replace(logits=out.logits * float("nan")) if len(calls) == 3 else out

    model.global_head.register_forward_hook(poison)
    with pytest.raises(NonFiniteLossError) as info:
        train_one_epoch(step, loader(), epoch=7, log_every=4, progress=False)
    err = info.value
    assert (err.epoch, err.batch) == (7, 2) and err.value != err.value  # NaN
    # detected on the device, read back after 4 batches; with NaN weights batch 3 already
    # fails (NaN attention maps are refused on the CPU), and the error still names batch 2
    assert consumed == [0, 1, 2, 3]
    # the failing step names the NaN weights (FloatingPointError), caused by the layer's check
    assert isinstance(err.__cause__, FloatingPointError) is not frozen
    if not frozen:
        assert "the model's weights hold NaN or infinite values" in str(err.__cause__)
        assert isinstance(err.__cause__.__cause__, ValueError)
    assert "at epoch 7, batch 2" in str(err) and "last checkpoint is the recovery point" in str(err)
    assert isinstance(err, RuntimeError)


def test_train_one_epoch_bad_input() -> None:
    _, _, step = make_step()
    with pytest.raises(ValueError, match="the training loader yielded no batches"):
        train_one_epoch(step, [], progress=False)
    with pytest.raises(TypeError, match="step must be a TrainStep, got function"):
        train_one_epoch(lambda x, y: None, [], progress=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="log_every must be >= 1, got 0"):
        train_one_epoch(step, [], log_every=0, progress=False)
    with pytest.raises(TypeError, match=r"batch 0: expected \(images, labels, ...\)"):
        train_one_epoch(step, [images(0)[0, 0, 0]], progress=False)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(3 * 4 * 6, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc(x.flatten(1))
        return out


def eval_loaders() -> tuple[DataLoader[Any], DataLoader[Any]]:
    g = torch.Generator().manual_seed(2)
    pids = torch.arange(40) % 8
    x = torch.randn(40, 3, 4, 6, generator=g) + 0.3 * pids[:, None, None, None].float()
    q = TensorDataset(x[:8], pids[:8], torch.zeros(8, dtype=torch.long))
    gal = TensorDataset(x[8:], pids[8:], torch.ones(32, dtype=torch.long))
    return DataLoader(q, batch_size=3), DataLoader(gal, batch_size=5)


@pytest.mark.parametrize("rerank", [False, True])
def test_evaluate_matches_extract_then_rank(rerank: bool) -> None:
    model = Tiny()
    q_loader, g_loader = eval_loaders()
    result = evaluate(model, q_loader, g_loader, rerank=rerank, metric="cosine")
    q = extract_features(model, q_loader, progress=False)
    g = extract_features(model, g_loader, progress=False)
    want = evaluate_features(
        q.features, g.features, q.pids, g.pids, q.camids, g.camids, metric="cosine", rerank=rerank
    )
    assert result.mAP == want.mAP and result.mINP == want.mINP
    assert 0 < result.mAP < 1
    assert list(result.cmc) == list(want.cmc)
    assert model.training  # the mode is restored
    with pytest.raises(ValueError, match="amp must be one of"):
        evaluate(model, q_loader, g_loader, amp="half")  # type: ignore[arg-type]


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.cuda
@CUDA
def test_cuda_default_amp() -> None:
    major, _ = torch.cuda.get_device_capability()
    assert default_amp("cuda") == ("bf16" if major >= 8 else "fp16")


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("amp", ["bf16", "fp16", None])
def test_cuda_step_never_syncs(amp: str | None) -> None:
    if amp == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("no bfloat16 on this GPU")
    model = small().cuda()
    criterion = LAGNetLoss(5, model.attention_dim).cuda()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, amsgrad=True, fused=True)
    step = TrainStep(model, criterion, optimizer, amp=amp, channels_last=True)  # type: ignore[arg-type]
    x, y = images(1).pin_memory(), LABELS.pin_memory()
    step(x, y)  # warm-up: lazy initialisation (cuDNN, optimizer state) may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        results = [step(x, y) for _ in range(2)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(r.loss).item() for r in results)
    assert results[0].loss.device.type == "cuda"


@pytest.mark.cuda
@CUDA
def test_cuda_train_one_epoch_and_evaluate() -> None:
    model = small().cuda()
    criterion = LAGNetLoss(5, model.attention_dim).cuda()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)
    step = TrainStep(model, criterion, optimizer, amp=default_amp("cuda"), channels_last=True)
    means = train_one_epoch(step, loader_of([images(i) for i in range(3)]), progress=False)
    assert all(v == v and abs(v) < float("inf") for v in means.values())
    tiny = Tiny().cuda()
    q_loader, g_loader = eval_loaders()
    on_gpu = evaluate(tiny, q_loader, g_loader)
    on_cpu = evaluate(Tiny(), q_loader, g_loader)
    assert on_gpu.mAP == pytest.approx(on_cpu.mAP, abs=1e-6)
    half = evaluate(
        tiny, q_loader, g_loader, amp="bf16" if torch.cuda.is_bf16_supported() else "fp16"
    )
    assert half.mAP == pytest.approx(on_cpu.mAP, abs=0.05)


@pytest.mark.cuda
@CUDA
def test_cuda_compiled_step_replays_cuda_graphs() -> None:
    model = small().cuda()
    criterion = LAGNetLoss(5, model.attention_dim).cuda()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, amsgrad=True, fused=True)
    step = TrainStep(
        model, criterion, optimizer, amp=default_amp("cuda"), channels_last=True, compile=True
    )
    assert step.cuda_graphs and step.compile_options["mode"] == "reduce-overhead"
    results = [step(images(i % 2), LABELS) for i in range(6)]  # warm-up, record, replays
    losses = torch.stack([r.loss for r in results]).cpu()  # the first are still readable
    assert torch.isfinite(losses).all()
    assert len(set(losses.tolist())) > 1  # each result is its own step's, not the last one's
    assert results[0].components["triplet"].device.type == "cuda"
    means = train_one_epoch(step, loader_of([images(i) for i in range(4)]), progress=False)
    assert all(v == v and abs(v) < float("inf") for v in means.values())


def run_benchmark(name: str, *args: str) -> list[str]:
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / name
    done = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, timeout=600,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.splitlines()


def test_bench_gpu_cpu_smoke_runs(tmp_path: Any) -> None:
    import json

    lines = run_benchmark("bench_gpu.py", "--cpu-smoke", "--json", str(tmp_path / "out.json"))
    assert lines[0].startswith("CPU (smoke), torch ")
    names = ["eager fp32", "eager bf16+CL", "compiled bf16+CL", "graphs bf16+CL"]
    rows = {line[:18].strip(): line[18:].split() for line in lines if line[:18].strip() in names}
    assert list(rows) == names
    assert rows["eager fp32"][1] == "1.00" and rows["eager fp32"][-1] == "(ref)"
    for name in names[1:]:
        assert float(rows[name][0]) > 0 and float(rows[name][2]) > 0
        assert 0.99 < float(rows[name][-1]) <= 1.0  # cosine to float32, same weights
    at = lines.index("loss, mean of each 3 steps: eager fp32 | compiled bf16+CL")
    assert lines[at - 1].startswith("compiled bf16+CL")  # printed as soon as both curves ran
    assert lines[at + 2].startswith("largest relative gap of a window: ")
    saved = json.loads((tmp_path / "out.json").read_text())
    assert list(saved["rows"]) == names
    curves = saved["curves"]
    assert [len(c) for c in curves.values()] == [3, 3]
    assert all(0 < v < 20 for c in curves.values() for v in c)


def test_bench_gpu_eval_cpu_smoke_runs() -> None:
    lines = run_benchmark("bench_gpu_eval.py", "--cpu-smoke", "--repeats", "1")
    assert lines[0].startswith("CPU (smoke), torch ")
    assert lines[2].split()[0] == "plain" and lines[2].endswith("identical")
    assert lines[3].split()[0] == "re-ranked" and lines[3].endswith("identical")
