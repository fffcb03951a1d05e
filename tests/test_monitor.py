"""The pillar monitor: statistics and the alarm rule (pure), hooks and generate() on tiny models, one real check."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LogitsProcessor

from hf_svdq.monitoring import AlarmRule, AlarmState, PillarMonitor, replay
from hf_svdq.monitoring.statistics import activation_entropy, activation_rms, logits_entropy

from .conftest import tiny_model

WATCH = ["model.layers.0.mlp.down_proj", "model.layers.1"]


@pytest.fixture(scope="module")
def llama() -> torch.nn.Module:
    return tiny_model("llama").eval()


@pytest.fixture(scope="module")
def prompt() -> torch.Tensor:
    return torch.randint(3, 128, (3, 7), generator=torch.Generator().manual_seed(0))


def _generate(model: torch.nn.Module, ids: torch.Tensor, tokens: int = 16, **kwargs: object) -> Any:  # ids, or a GenerateOutput
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, do_sample=False,
                              pad_token_id=0, **kwargs)


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# statistics and the rule ----------------------------------------------------------------------------
def test_statistics_on_crafted_rows() -> None:
    x = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 3.0, 0.0], [2.0, -2.0, 2.0, -2.0]])
    assert torch.allclose(activation_rms(x), torch.tensor([1.0, 1.5, 2.0]))
    assert torch.allclose(activation_entropy(x), torch.tensor([1.0, 0.0, 1.0]), atol=1e-6)
    uniform = torch.zeros(2, 50)
    assert torch.allclose(logits_entropy(uniform), torch.full((2,), math.log(50)))


def test_alarm_fires_after_patience_on_a_jump() -> None:
    rule = AlarmRule(threshold=3.0, warmup=4, patience=2)
    values = torch.tensor([1.0, 1.1, 0.9, 1.0, 1.05, 0.95, 5.0, 5.0, 5.0])[:, None, None].repeat(1, 2, 1)
    values[:, 1] = 1.0  # the second row stays flat
    first = replay(values, rule)
    assert first.tolist() == [7, -1]  # jump at step 6, second step past the threshold at 7


def test_alarm_directions_and_frozen_rows() -> None:
    drop = torch.tensor([1.0, 1.1, 0.9, 1.0, 1.05, 0.2, 0.2])[:, None, None]
    assert replay(drop, AlarmRule(threshold=3.0, warmup=3, patience=1)).tolist() == [-1]
    assert replay(drop, AlarmRule(threshold=3.0, warmup=3, patience=1, direction="down")).tolist() == [5]
    assert replay(drop, AlarmRule(threshold=3.0, warmup=3, patience=1, direction="both")).tolist() == [5]
    inactive = torch.ones(7, 1, dtype=torch.bool)
    inactive[4:] = False  # the row ended before the drop
    assert replay(drop, AlarmRule(threshold=3.0, warmup=3, patience=1, direction="down"), inactive).tolist() == [-1]


def test_online_state_matches_replay() -> None:
    values = 1 + 0.02 * torch.randn(30, 4, 3, generator=torch.Generator().manual_seed(0))
    values[20:, 1] += 1
    rule = AlarmRule(threshold=6.0, warmup=6, patience=2)
    state = AlarmState(rule, 4, 3)
    first = torch.full((4,), -1)
    for t in range(30):
        _, alarm = state.update(values[t])
        first = torch.where(alarm & (first < 0), t, first)
    assert torch.equal(first, replay(values, rule))
    assert first.tolist() == [-1, 21, -1, -1]


@pytest.mark.parametrize(("field", "value"), [("threshold", 0), ("direction", "sideways"), ("warmup", 0),
                                              ("patience", 1.5), ("min_std", -1)])
def test_rule_rejects_bad_fields(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"AlarmRule.{field}"):
        AlarmRule(**{field: value})  # type: ignore[arg-type]


# hooks and generate() ------------------------------------------------------------------------------
def test_monitor_rejects_bad_input(llama: torch.nn.Module) -> None:
    with pytest.raises(ValueError, match="no module named 'model.layers.7'"):
        PillarMonitor(llama, ["model.layers.7"])
    with pytest.raises(ValueError, match="statistic"):
        PillarMonitor(llama, WATCH, statistic="variance")
    with pytest.raises(ValueError, match="intervention"):
        PillarMonitor(llama, WATCH, intervention="dropout")
    with pytest.raises(ValueError, match="trigger"):
        PillarMonitor(llama, WATCH, trigger="vibes")
    with pytest.raises(ValueError, match="non-empty list"):
        PillarMonitor(llama, "model.layers.1")  # type: ignore[arg-type]
    assert _hook_count(llama) == 0  # a refused monitor leaves nothing attached


def test_hooks_attach_and_detach(llama: torch.nn.Module, prompt: torch.Tensor) -> None:
    before = _generate(llama, prompt)
    with PillarMonitor(llama, WATCH) as monitor:
        assert _hook_count(llama) == 3  # the model's pre-hook and one per watched module
        _generate(llama, prompt, logits_processor=[monitor])
    assert _hook_count(llama) == 0
    assert torch.equal(_generate(llama, prompt), before)


def test_no_alarm_changes_nothing(llama: torch.nn.Module, prompt: torch.Tensor) -> None:
    plain = _generate(llama, prompt, output_logits=True, return_dict_in_generate=True)
    never = AlarmRule(threshold=1e30)
    with PillarMonitor(llama, WATCH, rule=never, intervention="noise", noise_scale=10.0) as monitor:
        watched = _generate(llama, prompt, logits_processor=[monitor], output_logits=True, return_dict_in_generate=True)
        trace = monitor.trace()
    assert torch.equal(watched.sequences, plain.sequences)
    assert all(torch.equal(a, b) for a, b in zip(watched.logits, plain.logits, strict=True))  # the raw logits
    assert not trace.alarm.any()
    assert trace.values.shape == (16, 3, 2)  # one step per generated token, a value per watched module
    assert torch.isfinite(trace.values).all()


def test_noise_is_deterministic_with_a_seed(llama: torch.nn.Module, prompt: torch.Tensor) -> None:
    eager = AlarmRule(threshold=1e-3, warmup=1, patience=1, min_std=0.0)

    def run(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        with PillarMonitor(llama, WATCH, rule=eager, intervention="noise", noise_scale=3.0, seed=seed) as monitor:
            ids = _generate(llama, prompt, logits_processor=[monitor])
            return ids, monitor.trace().values

    ids_a, values_a = run(1)
    ids_b, values_b = run(1)
    _, values_c = run(2)
    assert torch.equal(ids_a, ids_b) and torch.equal(values_a, values_b)
    assert not torch.equal(values_a[:, :, 1], values_c[:, :, 1])  # layer 1 reads the noised layer-0 output
    assert not torch.equal(ids_a, _generate(llama, prompt))


class _ForceRepeat(LogitsProcessor):
    """Forces the tokens 5, 9, 5, 9, ... (a period-2 loop from the first generated token)."""

    def __init__(self, prompt_len: int) -> None:
        self.prompt_len = prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prompt_len
        forced = torch.full_like(scores, -1e9)
        forced[:, 5 if step % 2 == 0 else 9] = 0.0
        return forced  # type: ignore[return-value]


def test_token_trigger_and_loop_record(llama: torch.nn.Module, prompt: torch.Tensor) -> None:
    with PillarMonitor(llama, WATCH, trigger="tokens", rule=AlarmRule(threshold=1e30)) as monitor:
        _generate(llama, prompt, 12, logits_processor=[_ForceRepeat(prompt.shape[1]), monitor])
        summary = monitor.summary()
    # 6 generated tokens (min_span) make the loop visible at step 6; the token trigger alarms then
    assert summary == [{"alarm_step": 6, "loop_step": 6, "lead": 0}] * 3


def test_rows_stop_being_scored_after_their_end(llama: torch.nn.Module, prompt: torch.Tensor) -> None:
    class EndRowZero(LogitsProcessor):
        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            if input_ids.shape[1] == prompt.shape[1] + 2:
                scores[0] = -1e9
                scores[0, 2] = 0.0  # row 0 emits the end token as its third token
            return scores

    with PillarMonitor(llama, WATCH, eos_token_id=2) as monitor:
        _generate(llama, prompt, 8, logits_processor=[EndRowZero(), monitor], eos_token_id=2)
        active = monitor.trace().active
    assert active[:3, 0].all() and not active[3:, 0].any()
    assert active[:, 1:].all()


def test_a_new_generation_resets_the_record(llama: torch.nn.Module, prompt: torch.Tensor) -> None:
    with PillarMonitor(llama, WATCH) as monitor:
        _generate(llama, prompt, 10, logits_processor=[monitor])
        _generate(llama, prompt[:1], 4, logits_processor=[monitor])
        assert monitor.trace().values.shape == (4, 1, 2)


def test_from_policy_watches_the_pillars(llama: torch.nn.Module, tmp_path: Path) -> None:
    import json

    from hf_svdq.format.policy_file import POLICY_KEY, POLICY_VERSION

    policy = {POLICY_KEY: POLICY_VERSION, "ranks": {}, "dense": {}, "setting": {}, "layer_bits": None,
              "classes": {"model.layers.1.self_attn.v_proj": {"class": "pillar"},
                          "model.layers.0.mlp.up_proj": {"class": "robust"}}}
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(policy))
    with PillarMonitor.from_policy(llama, path) as monitor:
        assert monitor.modules == ["model.layers.1.self_attn.v_proj"]
    policy["classes"] = {}
    with pytest.raises(ValueError, match="no layer as a pillar"):
        PillarMonitor.from_policy(llama, policy)


@pytest.mark.real
def test_real_monitor_changes_no_token(smollm2_path: Path) -> None:
    """On SmolLM2, watching the policy's pillars (no intervention) leaves greedy output identical."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_path).eval()
    policy = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "analysis-smollm2-policy" / "policy.json"
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314]])
    plain = _generate(model, ids, 24)
    with PillarMonitor.from_policy(model, policy) as monitor:
        watched = _generate(model, ids, 24, logits_processor=[monitor])
        assert len(monitor.modules) == 23
        assert monitor.trace().values.shape == (24, 1, 23)
    assert torch.equal(watched, plain)
