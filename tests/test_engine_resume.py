"""Training stopped at a batch boundary and resumed from a saved TrainState ends with the
uninterrupted run's weights, bit for bit (CPU): what the server's crash resume relies on."""
from __future__ import annotations

import pytest
import torch

from advex.engine import zoo
from advex.engine.attacks import AttackConfig
from advex.engine.data import tsipras
from advex.engine.models import ModelInfo, ModelWrapper
from advex.engine.train import TrainConfig, load_state, save_state, train

D = 101


class Stop(Exception):
    pass


def fresh_model() -> ModelWrapper:
    torch.manual_seed(0)
    return ModelWrapper(zoo.build("mlp", (D,), 2, {"hidden": 16}), ModelInfo("mlp", (D,), 2))


def weights(model: ModelWrapper) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


CONFIGS = {
    "standard": TrainConfig(epochs=3, batch_size=32, lr=0.05, schedule="cosine", seed=4),
    "adversarial": TrainConfig(epochs=2, batch_size=32, lr=0.05, schedule="step", lr_step_epochs=1, seed=4,
                               adversarial=AttackConfig(norm="L2", eps=0.5, steps=3, step_size=0.3)),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("stop_at", [2, 7, 8])  # mid-epoch, mid-epoch, the last batch of epoch 2 (7 batches each)
def test_interrupted_training_resumes_bit_for_bit(tmp_path, name, stop_at):
    cfg = CONFIGS[name]
    data = tsipras(200, seed=1)
    whole_model = fresh_model()
    whole = train(whole_model, data, cfg)

    saved = tmp_path / "state.safetensors"

    def on_batch(done, total):
        if done == stop_at:
            raise Stop

    torch.manual_seed(123)  # the global generator moves between the runs; the state carries it
    with pytest.raises(Stop):
        train(fresh_model(), data, cfg, on_batch=on_batch, on_interrupt=lambda s: save_state(s, saved))
    state = load_state(saved)
    assert state.batches == stop_at and 0 < state.position <= len(data)
    resumed_model = fresh_model()
    torch.manual_seed(999)
    history = train(resumed_model, data, cfg, resume=state)
    a, b = weights(whole_model), weights(resumed_model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [(h.epoch, h.train_loss, h.train_accuracy) for h in history] == \
           [(h.epoch, h.train_loss, h.train_accuracy) for h in whole]


def test_epoch_checkpoints_resume_and_a_finished_state_trains_no_more(tmp_path):
    cfg = CONFIGS["standard"]
    data = tsipras(200, seed=1)
    whole_model = fresh_model()
    train(whole_model, data, cfg)
    states = []
    train(fresh_model(), data, cfg, on_checkpoint=lambda s: (save_state(s, tmp_path / f"e{s.epoch}"), states.append(s.epoch)))
    assert states == [1, 2, 3]
    after_one = fresh_model()
    train(after_one, data, cfg, resume=load_state(tmp_path / "e1"))
    finished = fresh_model()
    calls = []
    history = train(finished, data, cfg, resume=load_state(tmp_path / "e3"), on_batch=lambda d, t: calls.append(d))
    assert calls == [] and len(history) == 3
    for model in (after_one, finished):
        assert all(torch.equal(a, b) for a, b in zip(weights(whole_model).values(), weights(model).values()))


def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(ValueError, match="not a training checkpoint"):
        load_state(bad)
