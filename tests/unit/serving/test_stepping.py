"""A step that goes wrong is pinned on the adapter behind it: its requests fail (and the adapter is
refused for a while), everyone else in the step completes with what they would have got without it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from engine_support import Collected, make_engine, run_until_done
from safetensors.torch import load_file, save_file

from worker.serving.errors import AdapterLoadError
from worker.serving.params import SamplingParams

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
SAMPLED = SamplingParams(max_tokens=10, temperature=0.8, seed=5, ignore_eos=True)
PROMPT = [1, 504, 3458, 282, 4649, 314, 57, 1107]
HONEST = [("acme/1", GREEDY), (None, GREEDY), ("acme/3", SAMPLED), ("acme/4", GREEDY)]


def _rewrite(source: Path, target: Path, change) -> None:  # type: ignore[no-untyped-def]
    """A copy of the adapter at `source` with its tensors changed by `change(name, tensor)`."""
    target.mkdir(parents=True)
    (target / "adapter_config.json").write_bytes((source / "adapter_config.json").read_bytes())
    tensors = load_file(source / "adapter_model.safetensors")
    save_file(
        {name: change(name, t) for name, t in tensors.items()}, str(target / "adapter_model.safetensors")
    )


def _adapters(adapter_root: Path, tmp_path: Path) -> Path:
    """The shared adapters, plus `hot/1`: finite weights (they pass every load check) so large that its
    activations overflow to Inf; and `wide/1`: a lora_A one input too wide, for a loader that does not
    know the model's shapes."""
    root = tmp_path / "adapters"
    (root / "acme").mkdir(parents=True)
    for src in (adapter_root / "acme").iterdir():
        (root / "acme" / src.name).symlink_to(src)
    _rewrite(
        adapter_root / "acme" / "1", root / "hot" / "1", lambda n, t: t.sign() * 3e38 if "lora_A" in n else t
    )
    _rewrite(
        adapter_root / "acme" / "1",
        root / "wide" / "1",
        lambda n, t: torch.cat([t, t[:, :1]], dim=1) if "lora_A" in n and "layers.0." in n else t,
    )
    return root


def _outputs(engine, requests):  # type: ignore[no-untyped-def]
    collected = [Collected(engine, PROMPT, params, adapter) for adapter, params in requests]
    run_until_done(engine, collected)
    return collected


def test_an_adapter_that_overflows_at_runtime_fails_alone(
    tiny_model_dir: Path, adapter_root: Path, tmp_path: Path
) -> None:
    root = _adapters(adapter_root, tmp_path)
    alone = _outputs(make_engine(tiny_model_dir, root), HONEST)
    engine = make_engine(tiny_model_dir, root)
    mixed = _outputs(engine, [*HONEST[:2], ("hot/1", GREEDY), *HONEST[2:]])

    hot = mixed.pop(2)
    assert isinstance(hot.error, AdapterLoadError) and "hot/1 failed while generating" in hot.error.message
    assert [c.token_ids for c in mixed] == [c.token_ids for c in alone]
    assert all(c.error is None and len(c.token_ids) == 10 for c in mixed)
    # Refused from now on, without taking a step down again.
    again = _outputs(engine, [("hot/1", GREEDY), ("acme/1", GREEDY)])
    assert isinstance(again[0].error, AdapterLoadError) and again[1].token_ids == alone[0].token_ids


def test_a_step_that_raises_is_pinned_on_the_adapter_behind_it(
    tiny_model_dir: Path, adapter_root: Path, tmp_path: Path
) -> None:
    """Without the model's shapes the loader cannot see that `wide/1` does not fit: the step raises,
    each adapter's requests run alone to find whose, and only those fail."""
    root = _adapters(adapter_root, tmp_path)
    alone = _outputs(make_engine(tiny_model_dir, root), HONEST)
    engine = make_engine(tiny_model_dir, root)
    engine.adapters.shape = dataclasses.replace(engine.adapters.shape, module_shapes=None)
    mixed = _outputs(engine, [*HONEST[:2], ("wide/1", GREEDY), *HONEST[2:]])

    wide = mixed.pop(2)
    assert isinstance(wide.error, AdapterLoadError) and "wide/1" in wide.error.message
    assert [c.token_ids for c in mixed] == [c.token_ids for c in alone]
    assert engine.blocks.num_used == 0
