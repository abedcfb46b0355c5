"""Evaluation metrics on hand-built models with known answers, and on a tiny trained model."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from rattention import lifecycle
from rattention import metrics as M
from rattention.cache import cache_bytes
from rattention.evaluate import (
    bucket_losses,
    copy_loss,
    copy_sequences,
    efficiency,
    evaluate_path,
    position_losses,
    task_accuracy,
    task_scores,
)
from rattention.model import LM
from tests.conftest import tiny_run_config

V = 16


class FixedLogits(torch.nn.Module):
    """The same next-token distribution everywhere: p(0) = 1/2, the other 15 ids share the rest."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = torch.full((V,), math.log(0.5 / (V - 1)))
        logits[0] = math.log(0.5)
        return logits.expand(*tokens.shape, V).clone()


class Copier(torch.nn.Module):
    """Predicts the token ``distance - 1`` back (the next token of a copy made ``distance`` earlier)."""

    def __init__(self, distance: int):
        super().__init__()
        self.distance = distance

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, t = tokens.shape
        logits = torch.zeros(b, t, V)
        lag = self.distance - 1
        if lag < t:
            src = tokens[:, : t - lag]
            logits[:, lag:] = torch.nn.functional.one_hot(src, V).float() * 50.0
        return logits


def test_position_buckets_of_fixed_logits() -> None:
    # targets: token 0 in positions [0, 8), token 5 elsewhere; T = 24
    targets = torch.full((3, 24), 5)
    targets[:, :8] = 0
    targets[2, 20:] = -100  # padding is not counted
    inputs = torch.zeros_like(targets)
    total, count = position_losses(FixedLogits(), [(inputs, targets)])
    out = bucket_losses(total, count, [0, 8, 16])
    hit, miss = -math.log(0.5), -math.log(0.5 / (V - 1))
    assert out[M.val_loss_bucket(0, 8)] == pytest.approx(hit)
    assert out[M.val_loss_bucket(8, 16)] == pytest.approx(miss)
    assert out[M.val_loss_bucket(16, None)] == pytest.approx(miss)
    n_hit, n_miss = 3 * 8, 3 * 16 - 4
    assert out[M.VAL_LOSS] == pytest.approx((n_hit * hit + n_miss * miss) / (n_hit + n_miss))


def test_copy_loss_of_an_exact_copier() -> None:
    stream = torch.randint(0, V, (4000,), generator=torch.Generator().manual_seed(0))
    for d in (8, 24):
        seqs = copy_sequences(stream, d, span=6, samples=5)
        assert seqs.shape == (5, d + 6)
        assert torch.equal(seqs[:, :6], seqs[:, d:])  # the span, then the same span d tokens later
        assert copy_loss(Copier(d), seqs, d) == pytest.approx(0.0, abs=1e-6)
        other = 24 if d == 8 else 8
        assert copy_loss(Copier(other), seqs, d) >= math.log(V) - 1e-4  # the wrong distance: no better than chance
    # a span longer than the distance is cut to the distance
    assert copy_sequences(stream, 4, span=6, samples=2).shape == (2, 8)


def test_task_accuracy_of_oracle_and_wrong_models() -> None:
    tokens = torch.tensor([[1, 2, 3, 4, 1, 2, 3, 4]])
    answers = [np.array([5, 6, 7])]  # tokens 2, 3, 4 at distance 4 after their first copy
    assert task_accuracy(Copier(4), tokens, answers) == 1.0
    assert task_accuracy(Copier(3), tokens, answers) == 0.0


def test_task_answer_loss_of_known_models() -> None:
    tokens = torch.tensor([[1, 2, 3, 4, 1, 2, 3, 4], [0, 0, 5, 6, 0, 0, 5, 6]])
    answers = [np.array([5, 6, 7]), np.array([6, 7])]
    acc, loss = task_scores(Copier(4), tokens, answers, batch_size=1)  # chunks of one row give the same sums
    assert acc == 1.0 and loss == pytest.approx(0.0, abs=1e-6)
    acc, loss = task_scores(FixedLogits(), tokens, answers)
    # FixedLogits puts 1/2 on id 0: answers 2, 3, 4 and 5, 6 are misses, each -log(0.5 / 15)
    assert acc == 0.0 and loss == pytest.approx(-math.log(0.5 / (V - 1)))
    acc, loss = task_scores(FixedLogits(), torch.tensor([[3, 0, 0]]), [np.array([1, 2])])
    assert acc == 1.0 and loss == pytest.approx(-math.log(0.5))


def test_efficiency_uses_the_real_cache_accounting(train_dataset: Path) -> None:
    cfg = tiny_run_config(train_dataset)
    out = efficiency(cfg, LM(cfg.model), train_tokens_per_s=1000.0)
    for ctx in (32, 128, 32768):
        assert out[M.cache_bytes_at(ctx)] == cache_bytes(cfg.model, ctx)
    model = LM(cfg.model)
    assert out[M.PARAMS] == model.num_params()
    assert out[M.PARAMS_NON_EMBEDDING] == model.num_params(exclude_embedding=True)
    assert out[M.DECODE_THROUGHPUT] > 0 and out[M.PEAK_MEMORY] > 0 and out[M.TRAIN_THROUGHPUT] == 1000.0
    assert M.MFU not in out  # CPU


def test_eval_of_a_trained_run_folder(train_dataset: Path, tmp_path: Path) -> None:
    cfg = tiny_run_config(train_dataset, "train.steps=8", "eval.enabled=false")
    lifecycle.run(cfg, tmp_path / "run", progress=False)
    got_cfg, results, state = evaluate_path(tmp_path / "run", ["eval.tasks=[mqar,niah]"])
    assert state["step"] == 8 and got_cfg.model.window == 8
    for key in (M.VAL_LOSS, M.val_loss_bucket(0, 8), M.val_loss_bucket(8, 16), M.val_loss_bucket(16, None),
                M.copy_loss(4), M.copy_loss(16), M.task_accuracy("niah", 64), M.task_loss("mqar", 32),
                M.cache_bytes_at(128)):
        assert key in results and math.isfinite(results[key]), key
    assert 0 < results[M.VAL_LOSS] < math.log(64) + 0.5
    # a checkpoint file directly gives the same numbers
    ckpt = sorted((tmp_path / "run" / "checkpoints").glob("*.pt"))[-1]
    _, again, _ = evaluate_path(ckpt, ["eval.tasks=[mqar,niah]"])
    assert again[M.VAL_LOSS] == pytest.approx(results[M.VAL_LOSS])


def test_task_loss_names_parse_and_are_produced_with_the_accuracy() -> None:
    from rattention.run_config import EvalConfig

    name = M.task_loss("copy", 130)
    assert name == "eval/copy_loss_len130" and M.default_direction(name) == "minimize"
    assert M.parse_metric(name) == {"family": "task_loss", "name": name, "task": "copy", "length": 130}
    assert M.parse_metric("eval/copy_loss_d128")["family"] == "copy_loss"  # the text copy loss keeps its family
    assert M.parse_metric("eval/maze_loss_len130") is None
    ev = EvalConfig(tasks=["copy"], task_lengths=[1, 2])
    assert M.produced_by(name, ev, 130) == (True, "") and M.produced_by("eval/copy_loss_len260", ev, 130)[0]
    assert "add copy to eval.tasks" in M.produced_by(name, EvalConfig(), 130)[1]
    assert M.suggest("eval/copy_los_len130") == name


@pytest.mark.parametrize("window", [8, 24])
def test_copy_task_without_fixed_params_puts_its_evidence_past_the_window(train_dataset: Path, window: int) -> None:
    from rattention.evaluate import task_metrics

    def copier(lag: int):  # predicts the token ``lag`` positions back, over 64 ids
        def model(tokens: torch.Tensor) -> torch.Tensor:
            logits = torch.zeros(*tokens.shape, 64)
            logits[:, lag:] = torch.nn.functional.one_hot(tokens[:, : tokens.shape[1] - lag], 64).float() * 50.0
            return logits
        return model

    cfg = tiny_run_config(train_dataset, "eval.tasks=[copy]", "eval.task_lengths=[1]", "model.seq_len=64",
                          f"model.window={window}")
    w = cfg.model.window
    d = max(16, w + 1)  # a 16-token span, then filler up to w + 1 tokens: the evidence lies past the window
    out = task_metrics(copier(d), cfg, eos_id=0, vocab_size=64)
    assert out[M.task_accuracy("copy", 64)] == 1.0 and out[M.task_loss("copy", 64)] == pytest.approx(0, abs=1e-6)
    out = task_metrics(copier(w), cfg, eos_id=0, vocab_size=64)  # what a window of w reaches: the wrong token
    assert out[M.task_accuracy("copy", 64)] < 0.2
