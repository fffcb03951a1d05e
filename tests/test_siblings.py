"""Sibling projections (q/k/v, gate/up) in one compiled-kernel call: linked on load, bit-identical, guarded."""

from __future__ import annotations

import copy
import pickle
import threading
from collections import Counter

import pytest
import torch

from hf_svdq.kernels import backend
from hf_svdq.nn.siblings import link_siblings, unlink_siblings

from .test_cpp_kernels import _module


@pytest.fixture
def cpp_backend(monkeypatch):
    """The compiled kernels at the best instruction set, fused for up to 16 rows."""
    _module()
    monkeypatch.setenv(backend.BACKEND_ENV, "cpp")
    monkeypatch.setenv(backend.ROWS_ENV, "16")
    backend.reset()
    yield backend.active()
    backend.reset()


@pytest.fixture
def model(tiny_checkpoint):
    from transformers import AutoModelForCausalLM

    from hf_svdq import SVDQuantConfig

    config = SVDQuantConfig(rank=4, residual_bits=4, group_size=32)
    return AutoModelForCausalLM.from_pretrained(tiny_checkpoint("llama"), quantization_config=config).eval()


class CountingKernels:
    """The compiled module with its entry points counted."""

    def __init__(self, inner):
        self.inner, self.calls = inner, Counter()

    def __getattr__(self, name):
        target = getattr(self.inner, name)
        if name not in ("forward", "forward_siblings"):
            return target

        def counted(*args):
            self.calls[name] += 1
            return target(*args)
        return counted


def count_calls(chosen) -> Counter:
    counting = CountingKernels(chosen.compiled)
    object.__setattr__(chosen, "compiled", counting)  # the cached Backend of this test; cpp_backend resets it
    return counting.calls


def _sibling_groups(model) -> set[int]:
    return {id(m.__dict__["_svdq_siblings"][0]) for m in model.modules() if "_svdq_siblings" in m.__dict__}


def test_loading_links_q_k_v_and_gate_up_in_every_block(model):
    assert len(_sibling_groups(model)) == 2 * len(model.model.layers)
    attn = model.model.layers[0].self_attn
    group, index = attn.v_proj.__dict__["_svdq_siblings"]
    assert group.members == (attn.q_proj, attn.k_proj, attn.v_proj) and index == 2
    assert "_svdq_siblings" not in model.model.layers[0].mlp.down_proj.__dict__
    assert set(model.state_dict()) == set(copy.deepcopy(model).state_dict())


def test_a_decode_step_makes_two_sibling_calls_and_two_single_calls_per_block(cpp_backend, model):
    calls = count_calls(cpp_backend)
    layers = len(model.model.layers)
    with torch.no_grad():
        linked = model(torch.tensor([[5]])).logits
    assert calls == Counter(forward_siblings=2 * layers, forward=2 * layers)
    calls.clear()
    unlink_siblings(model)
    with torch.no_grad():
        alone = model(torch.tensor([[5]])).logits
    assert calls == Counter(forward=7 * layers)
    assert torch.equal(linked, alone)


def test_generate_gives_the_same_logits_and_tokens_linked_and_alone(cpp_backend, model):
    prompt = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        linked = model.generate(prompt, max_new_tokens=12, do_sample=False, output_logits=True, return_dict_in_generate=True)
        unlink_siblings(model)
        alone = model.generate(prompt, max_new_tokens=12, do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(linked.sequences, alone.sequences)
    assert all(torch.equal(a, b) for a, b in zip(linked.logits, alone.logits))


def test_a_sibling_computes_alone_when_its_input_is_another_tensor_or_was_modified(cpp_backend, model):
    attn = model.model.layers[0].self_attn
    x = torch.randn(1, 1, attn.q_proj.in_features)
    with torch.no_grad():
        attn.q_proj(x)  # computes and keeps k and v for this x
        x.add_(1.0)  # in place: the kept outputs are stale
        k_after, v_other = attn.k_proj(x), attn.v_proj(x.clone())
        unlink_siblings(model)
        assert torch.equal(k_after, attn.k_proj(x)) and torch.equal(v_other, attn.v_proj(x))
        link_siblings(model)
        attn.q_proj(x)
        kept = attn.k_proj(x)
        assert torch.equal(kept, attn.k_proj.__dict__["_svdq_siblings"][0].members[1](x))  # once kept, then alone


def test_outside_decode_every_layer_computes_alone(cpp_backend, model):
    calls = count_calls(cpp_backend)
    with torch.no_grad():
        model(torch.arange(20)[None] % 100)  # 20 rows: prefill, past the 16-row threshold
    assert calls["forward_siblings"] == 0
    x = torch.randn(1, 1, 64, requires_grad=True)
    model.model.layers[0].self_attn.q_proj(x).sum().backward()  # a gradient: the differentiable reference
    assert calls["forward_siblings"] == 0 and x.grad is not None


def test_links_survive_deepcopy_and_pickle_with_their_own_modules(cpp_backend, model):
    step = torch.tensor([[5]])
    with torch.no_grad():
        expected = model.model(step).last_hidden_state
        model.model.layers[0].self_attn.q_proj(torch.randn(1, 1, 64))  # kept outputs are not carried along
        # the body pickled: the model's bound push_to_hub does not pickle
        for other in (copy.deepcopy(model).model, pickle.loads(pickle.dumps(model.model))):
            attn = other.layers[0].self_attn
            group = attn.k_proj.__dict__["_svdq_siblings"][0]
            assert group.members == (attn.q_proj, attn.k_proj, attn.v_proj) and group.kept == [None] * 3
            assert attn.q_proj is not model.model.layers[0].self_attn.q_proj
            assert torch.equal(other(step).last_hidden_state, expected)


def test_two_threads_generating_at_once_give_the_tokens_of_one(cpp_backend, model):
    prompts = [torch.tensor([[1, 5, 9, 2]]), torch.tensor([[7, 3, 3, 8, 1]])]
    with torch.no_grad():
        alone = [model.generate(p, max_new_tokens=12, do_sample=False) for p in prompts]
        together: dict[int, list[torch.Tensor]] = {0: [], 1: []}

        def run(i: int) -> None:
            for _ in range(5):
                together[i].append(model.generate(prompts[i], max_new_tokens=12, do_sample=False))

        workers = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    assert all(torch.equal(t, alone[i]) for i in range(2) for t in together[i])


def test_only_compatible_residual_layers_are_linked(model):
    mlp = model.model.layers[1].mlp
    mlp.up_proj.group_size = 64  # as if stored with another group size
    unlink_siblings(model)
    assert link_siblings(model) == 2 * len(model.model.layers) - 1
    assert "_svdq_siblings" not in mlp.gate_proj.__dict__
