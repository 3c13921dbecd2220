"""Training behaviour on tiny models and synthetic scenes (seconds each)."""

from __future__ import annotations

import copy
import logging
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from huggingface_hub import ModelCard

from lseg import LSeg, LSegError
from lseg.data import SyntheticStreetScenes
from lseg.model import load_preset
from lseg.train.callbacks import ExportPretrained
from lseg.train.datamodule import LSegDataModule
from lseg.train.module import LSegModule, NonFiniteLossError, class_balanced_weights

SIZE = [64, 80]


def data(batch_size: int = 4, train=None, num_workers: int = 0, **kwargs) -> LSegDataModule:
    train = train or [{"name": "synthetic", "options": {"num_images": 16, "size": SIZE, "seed": 0}}]
    return LSegDataModule(
        train=train,
        val={"name": "synthetic", "options": {"num_images": 4, "size": SIZE, "seed": 1}},
        batch_size=batch_size,
        num_workers=num_workers,
        crop_size=64,
        base_size=80,
        **kwargs,
    )


def trainer(tmp_path, **kwargs) -> L.Trainer:
    options = {
        "accelerator": "cpu",
        "max_epochs": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "default_root_dir": str(tmp_path),
        "deterministic": True,
    }
    options.update(kwargs)
    return L.Trainer(**options)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def head_calls(module: LSegModule, monkeypatch) -> list[tuple[int, torch.Tensor]]:
    """Filled during training with each head call's (images, label embeddings asked)."""
    calls = []
    original = module.model.classify_decoded

    def spy(decoded, text, size):
        calls.append((decoded.shape[0], text.clone()))
        return original(decoded, text, size)

    monkeypatch.setattr(module.model, "classify_decoded", spy)
    return calls


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])  # the CPU CamVid recipe trains in bf16
def test_a_few_steps_lower_the_loss(tmp_path, precision):
    L.seed_everything(0)
    module = LSegModule(model="tiny", optimizer="adamw", lr=0.002, head_lr_multiplier=1.0)
    datamodule = data()
    fixed = trainer(tmp_path, max_steps=1)
    fixed.fit(module, datamodule=datamodule)  # sets up data and optimizer
    batch = next(iter(datamodule.train_dataloader()))
    module.eval()
    with torch.no_grad():
        before = module._loss(batch).item()
    trainer(tmp_path, max_epochs=6, enable_checkpointing=False, precision=precision).fit(
        module, datamodule=datamodule
    )
    module.eval()
    with torch.no_grad():
        after = module._loss(batch).item()
    assert after < 0.8 * before


@pytest.mark.parametrize("native", [True, False])
def test_bf16_training_on_a_cpu_without_native_bfloat16_warns(tmp_path, monkeypatch, native):
    monkeypatch.setattr("lseg.train.module.cpu_has_native_bfloat16", lambda: native)
    module = LSegModule(model="tiny", optimizer="adamw", lr=0.002)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, max_steps=1, enable_checkpointing=False, precision="bf16-mixed").fit(
            module, datamodule=data()
        )
    assert any("32-true" in str(w.message) for w in caught) == (not native)


class Interrupt(L.Callback):
    """Stops the run after its first epoch, as a preempted job would be."""

    def on_train_epoch_end(self, trainer, pl_module):
        trainer.should_stop = True


def test_resume_continues_identically(tmp_path):
    def run(folder, interrupt=False, ckpt_path=None):
        L.seed_everything(0)
        module = LSegModule(model="tiny", optimizer="sgd", lr=0.01)
        checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=folder / "ckpt", save_last=True)
        t = trainer(folder, max_epochs=3, callbacks=[checkpoint, *([Interrupt()] if interrupt else [])])
        t.fit(module, datamodule=data(num_workers=1 if interrupt else 0), ckpt_path=ckpt_path)
        return module

    straight = run(tmp_path / "a")
    run(tmp_path / "b", interrupt=True)
    resumed = run(tmp_path / "b", ckpt_path=str(tmp_path / "b" / "ckpt" / "last.ckpt"))
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


REQUEUED_SLURM_JOB = {  # the environment srun gives the one task of a requeued single-task job
    "SLURM_JOB_ID": "7", "SLURM_JOB_NAME": "lseg", "SLURM_RESTART_COUNT": "1", "SLURM_NTASKS": "1",
    "SLURM_NTASKS_PER_NODE": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
    "SLURM_NODELIST": "localhost",
}  # fmt: skip


class SignalAtStep(L.Callback):
    """Delivers `signum` to this process after global step `step`, as a scheduler preempting the job
    (SIGTERM) or nearing its time limit (SIGUSR1) would."""

    def __init__(self, step: int, signum: int = int(signal.SIGTERM)) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def slurm_job(monkeypatch, folder) -> Path:
    """This process as the one task of SLURM job 7; `scontrol` records its arguments in the file returned."""
    for key, value in REQUEUED_SLURM_JOB.items():
        monkeypatch.setenv(key, value)
    (folder / "bin").mkdir(parents=True)
    scontrol = folder / "bin" / "scontrol"
    scontrol.write_text('#!/bin/sh\necho "$@" >> "$(dirname "$0")/calls"\n')
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{scontrol.parent}{os.pathsep}{os.environ['PATH']}")
    return folder / "bin" / "calls"


@pytest.mark.parametrize(
    ("num_workers", "preemption"), [(0, "sigterm"), (2, "sigterm"), (0, "slurm time limit (sigusr1)")]
)
def test_resume_after_a_preemption_mid_epoch_continues_identically(
    tmp_path, monkeypatch, num_workers, preemption
):
    """Regression: the resumed epoch restarted at its first batch while Lightning counted the batches
    before the preemption as done, so those were trained twice and the epoch's last ones never. Under
    SLURM, SIGUSR1 made Lightning save an hpc checkpoint wherever the signal landed (mid-step too)."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from lseg.train.callbacks import SignalCheckpoint

    def run(folder, callbacks=(), ckpt_path=None):
        L.seed_everything(0)
        module = LSegModule(model="tiny", optimizer="sgd", lr=0.01)
        checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=folder / "ckpt", save_last=True)
        t = trainer(folder, max_epochs=3, callbacks=[*callbacks, checkpoint, SignalCheckpoint()])
        t.fit(module, datamodule=data(num_workers=num_workers), ckpt_path=ckpt_path)
        return module

    straight = run(tmp_path / "a")
    signum = signal.SIGTERM
    if preemption != "sigterm":
        signum, requeued = signal.SIGUSR1, slurm_job(monkeypatch, tmp_path)
    with pytest.raises(SIGTERMException):
        run(tmp_path / "b", callbacks=[SignalAtStep(6, signum)])  # epoch 1 of 3, after 2 of its 4 batches
    saved = torch.load(tmp_path / "b" / "ckpt" / "last.ckpt", weights_only=False)
    assert (saved["epoch"], saved["global_step"]) == (1, 6)
    if preemption != "sigterm":
        assert requeued.read_text() == "requeue 7\n" and not list((tmp_path / "b").glob("hpc_ckpt_*"))
    resumed = run(tmp_path / "b", ckpt_path=str(tmp_path / "b" / "ckpt" / "last.ckpt"))
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_each_epoch_draws_new_augmentations_without_set_epoch(tmp_path, monkeypatch):
    """Lightning < 2.6's DDP sampler wrapper does not pass set_epoch on: the epoch comes from the trainer."""
    from lightning.pytorch.loops import fit_loop

    from lseg.train.datamodule import SeededSamples

    monkeypatch.setattr(fit_loop, "_set_sampler_epoch", lambda dataloader, epoch: None)
    datamodule = data()
    seeds: dict[tuple[int, int], int] = {}
    original = SeededSamples.__getitem__

    def spy(self, item):
        index, seed = item
        seeds[datamodule.trainer.current_epoch, index] = seed
        return original(self, item)

    monkeypatch.setattr(SeededSamples, "__getitem__", spy)
    module = LSegModule(model="tiny", optimizer="adamw")
    trainer(tmp_path, max_epochs=2, limit_val_batches=0, enable_checkpointing=False).fit(
        module, datamodule=datamodule
    )
    assert len(seeds) == 2 * 16
    assert all(seeds[0, index] != seeds[1, index] for index in range(16))


def test_mixed_batches_use_each_datasets_own_labels(tmp_path, monkeypatch):
    datamodule = data(
        batch_size=8,
        train=[
            {"name": "synthetic", "options": {"num_images": 8, "size": SIZE, "seed": 0}},
            {
                "name": "synthetic",
                "labels": ["clouds", "street", "house", "vegetation", "automobile", "pedestrian"],
                "options": {"num_images": 8, "size": SIZE, "seed": 5},
            },
        ],
    )
    module = LSegModule(model="tiny")
    seen = head_calls(module, monkeypatch)
    trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(module, datamodule=datamodule)
    sets = datamodule.label_sets
    assert sets["1:synthetic"][0] == "clouds" and sets["0:synthetic"][0] == "sky"
    assert len(seen) == 2 and sum(rows for rows, _ in seen) == 8  # one head call per dataset in the batch
    own = [module.model.encode_text(sets[key]) for key in ("0:synthetic", "1:synthetic")]
    for _, text in seen:
        assert sum(torch.equal(text, candidate) for candidate in own) == 1
    assert not torch.equal(seen[0][1], seen[1][1])


def test_non_finite_loss_stops_with_a_clear_message(tmp_path):
    module = LSegModule(model="tiny", optimizer="sgd", lr=1e30, scale_lr=False)
    with pytest.raises(NonFiniteLossError, match=r"loss is (nan|inf) at global step \d+"):
        trainer(tmp_path, max_epochs=3, enable_checkpointing=False).fit(module, datamodule=data())


def optimizer_settings(module: LSegModule, tmp_path, batch_size: int = 8) -> dict[str, dict]:
    """Each trainable parameter's name -> its optimizer group (initial lr, weight decay)."""
    t = trainer(tmp_path, max_steps=1, limit_val_batches=0)
    t.fit(module, datamodule=data(batch_size=batch_size))
    names = {id(p): n for n, p in module.model.named_parameters()}
    return {names[id(p)]: g for g in t.optimizers[0].param_groups for p in g["params"]}


def test_learning_rate_scales_with_batch_and_head_is_faster(tmp_path):
    module = LSegModule(model="tiny", optimizer="sgd", lr=0.004, head_lr_multiplier=10)
    settings = optimizer_settings(module, tmp_path)
    for name, group in settings.items():
        expected = 0.004 * 8 / 16 * (1 if name.startswith("image_encoder.") else 10)
        assert group["initial_lr"] == pytest.approx(expected), name
    assert any(not name.startswith("image_encoder.") for name in settings)
    assert not any(name.startswith("text_encoder.") for name in settings)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_no_weight_decay_on_norms_biases_embeddings_and_logit_scale(tmp_path, optimizer):
    from lseg.model import load_preset

    config = {**load_preset("tiny").to_dict(), "learn_logit_scale": True}
    module = LSegModule(model=config, pretrained=False, optimizer=optimizer, weight_decay=0.05)
    settings = optimizer_settings(module, tmp_path)
    parameters = dict(module.model.named_parameters())
    exempt = {"image_encoder.model.pos_embed", "image_encoder.model.cls_token", "head.log_logit_scale"}
    assert exempt <= set(settings)
    for name, group in settings.items():
        no_decay = parameters[name].ndim <= 1 or name.endswith(".bias") or name in exempt
        assert group["weight_decay"] == (0.0 if no_decay else 0.05), name
    assert any(group["weight_decay"] == 0.05 for group in settings.values())


def test_export_and_checkpoint_load_as_models(tmp_path):
    module = LSegModule(model="tiny")
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "ckpt", monitor="val/miou", mode="max"
    )
    datamodule = data()
    trainer(tmp_path, limit_train_batches=2, callbacks=[checkpoint, ExportPretrained()]).fit(
        module, datamodule=datamodule
    )
    assert checkpoint.best_model_path
    exported = LSeg.from_pretrained(tmp_path / "model")
    from_ckpt = LSeg.from_pretrained(checkpoint.best_model_path)
    images = torch.randn(1, 3, 32, 32)
    text = exported.encode_text(["a", "b"])
    assert torch.equal(exported.eval()(images, text).logits, from_ckpt.eval()(images, text).logits)
    card = ModelCard.load(tmp_path / "model" / "README.md").data
    training = card.lseg["results"]["train"]
    assert training["training"]["label_sets"] == {"synthetic": list(datamodule.label_sets["synthetic"])}
    assert training["training"]["checkpoint"] == "best" and training["dataset"] == "synthetic"
    assert training["metrics"]["miou"] == pytest.approx(float(checkpoint.best_model_score))
    assert set(training["metrics"]) == {"miou", "pixel_accuracy", "mean_class_accuracy"}
    assert {r.metric_type for r in card.eval_results} == set(training["metrics"])


def test_export_without_a_monitor_writes_the_final_weights(tmp_path):
    module = LSegModule(model="tiny")
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor=None)
    trainer(tmp_path, max_epochs=2, limit_train_batches=2, callbacks=[checkpoint, ExportPretrained()]).fit(
        module, datamodule=data()
    )
    exported = LSeg.from_pretrained(tmp_path / "model")
    for name, value in module.model.state_dict().items():
        assert torch.equal(exported.state_dict()[name], value), name
    training = ModelCard.load(tmp_path / "model" / "README.md").data.lseg["results"]["train"]
    assert training["training"]["checkpoint"] == "final" and training["training"]["epoch"] == 1


def test_training_that_ends_between_validations_scores_the_exported_weights(tmp_path):
    """A step budget ending after the last validation (CamVid: 2,800 steps, the last validation at
    step 2,700): the final weights are validated once more, and the card gives their scores and step."""
    module = LSegModule(model="tiny")
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor=None)
    datamodule = data()  # 4 batches an epoch: validations at steps 4 and 8, training ends at step 6
    fit = trainer(tmp_path, max_epochs=-1, max_steps=6, callbacks=[checkpoint, ExportPretrained()])
    fit.fit(module, datamodule=datamodule)
    training = ModelCard.load(tmp_path / "model" / "README.md").data.lseg["results"]["train"]
    assert training["training"] == {
        "checkpoint": "final", "epoch": 1, "step": 6, "label_sets": training["training"]["label_sets"]
    }  # fmt: skip
    exported = LSegModule(model="tiny")
    exported.model = LSeg.from_pretrained(tmp_path / "model")
    scores = trainer(tmp_path).validate(exported, datamodule=datamodule, verbose=False)[0]
    expected = {key.removeprefix("val/"): value for key, value in scores.items() if key != "val/loss"}
    assert training["metrics"] == pytest.approx(expected)


def test_export_reports_the_scores_of_the_exported_weights():
    """Best checkpoint: the validation run that reached its score; none: the last run; resumed: the score."""
    from types import SimpleNamespace

    export = ExportPretrained()
    export.validations = [
        {"epoch": 0, "step": 4, "metrics": {"miou": 0.5, "pixel_accuracy": 0.8}},
        {"epoch": 1, "step": 8, "metrics": {"miou": 0.25, "pixel_accuracy": 0.9}},
    ]
    datamodule = attached(data(), LSegModule("tiny", pretrained=False))
    datamodule.setup("fit")
    trainer = SimpleNamespace(datamodule=datamodule)
    best = SimpleNamespace(monitor="val/miou", best_model_score=torch.tensor(0.5))
    report = export._report(trainer, best)
    assert report["metrics"] == {"miou": 0.5, "pixel_accuracy": 0.8}
    label_sets = {"synthetic": datamodule.label_sets["synthetic"]}  # training sets only, not validation's
    assert report["training"] == {"checkpoint": "best", "epoch": 0, "step": 4, "label_sets": label_sets}
    assert report["dataset"] == {"name": "synthetic", "split": "train"} and report["command"] == "train"
    final = export._report(trainer, None)
    assert final["metrics"]["miou"] == 0.25 and final["training"]["checkpoint"] == "final"
    resumed = export._report(
        trainer, SimpleNamespace(monitor="val/miou", best_model_score=torch.tensor(0.75))
    )
    assert resumed["metrics"] == {"miou": 0.75} and "epoch" not in resumed["training"]


def attached(datamodule: LSegDataModule, module: LSegModule) -> LSegDataModule:
    """`datamodule` as a Trainer running `module` sees it (without fitting)."""
    datamodule.trainer = SimpleNamespace(
        lightning_module=module, current_epoch=0, global_rank=0, world_size=1
    )
    return datamodule


def test_label_count_must_match_classes():
    datamodule = data(train=[{"name": "synthetic", "labels": ["only", "two"], "options": {"num_images": 2}}])
    attached(datamodule, LSegModule("tiny", pretrained=False))
    with pytest.raises(LSegError, match="6 classes, 2 labels"):
        datamodule.setup("fit")


def test_data_is_normalised_with_the_models_mean_and_std():
    imagenet = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    module = LSegModule({**load_preset("tiny").to_dict(), **imagenet}, pretrained=False)
    datamodule = attached(data(), module)
    datamodule.setup("fit")
    normalize = datamodule.train_datasets["synthetic"].transform.transforms[-1]
    assert (normalize.mean, normalize.std) == (imagenet["mean"], imagenet["std"])
    # Validation samples stay untransformed: the model's processor normalises them, as in evaluation.
    raw = SyntheticStreetScenes(4, size=tuple(SIZE), seed=1)[0]["image"].as_subclass(torch.Tensor)
    assert torch.equal(datamodule.val_dataset[0]["image"].as_subclass(torch.Tensor), raw)


def test_data_without_a_model_fails_loudly():
    with pytest.raises(LSegError, match="model's mean/std"):
        data().setup("fit")


def run_smoke_training(folder, *extra: str) -> subprocess.CompletedProcess:
    """`lseg train --config configs/smoke.yaml` in a fresh process, as a user runs it."""
    from tests.conftest import REPO_ROOT

    command = [
        sys.executable,
        "-m",
        "lseg.cli.main",
        "train",
        "--config",
        str(REPO_ROOT / "configs" / "smoke.yaml"),
        "--trainer.default_root_dir",
        str(folder),
        "--trainer.enable_progress_bar",
        "false",
        *extra,
    ]
    environment = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment)


def test_lseg_train_cli_runs_the_smoke_config(tmp_path):
    result = run_smoke_training(tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "model" / "model.safetensors").is_file()
    assert ModelCard.load(tmp_path / "model" / "README.md").data.lseg["results"]["train"]["metrics"]
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


def test_two_process_validation_scores_each_image_once(tmp_path):
    """DDP over 2 CPU processes (gloo), launched the way `lseg train` is launched on a node.
    Regression: Lightning's padding DistributedSampler scored 6 samples for 5 validation images on 2
    ranks (image 0 twice), so val/miou was not what `lseg evaluate` reports for the same weights."""
    from lseg.evaluate.runner import evaluate_dataset

    odd = tmp_path / "odd-val.yaml"
    odd.write_text(
        "trainer: {limit_val_batches: 1.0}\n"
        "data: {val: {name: synthetic, options: {num_images: 5, size: [96, 128], seed: 1}}}\n"
    )
    result = run_smoke_training(
        tmp_path, "--config", str(odd), "--trainer.strategy", "ddp", "--trainer.devices", "2"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "distributed_backend=gloo" in result.stderr
    validated = ModelCard.load(tmp_path / "model" / "README.md").data.lseg["results"]["train"]["metrics"]
    model = LSeg.from_pretrained(tmp_path / "model")
    report = evaluate_dataset(model, SyntheticStreetScenes(5, size=(96, 128), seed=1), protocol="single")
    assert validated["miou"] == pytest.approx(report.metrics["miou"], abs=1e-6)
    assert validated["pixel_accuracy"] == pytest.approx(report.metrics["pixel_accuracy"], abs=1e-6)


def test_a_requeued_job_resumes_from_the_checkpoint_with_the_most_steps(tmp_path):
    """Regression: without --ckpt_path a SLURM job resumed only from Lightning's hpc_ckpt_*.ckpt, so a
    job requeued after a SIGTERM ignored the last.ckpt saved then. The newest is chosen by the step it
    records, not by file time (a copy or another node's clock changes that). A real requeued job
    resuming this way: tests/cluster/test_slurm_training.py."""
    from lseg.train.cli import newest_checkpoint

    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    last, hpc = checkpoints / "last.ckpt", tmp_path / "hpc_ckpt_1.ckpt"
    assert newest_checkpoint(tmp_path, checkpoints) is None

    def save(path: Path, step: int, mtime: float) -> None:
        torch.save({"global_step": step, "state_dict": {}}, path)
        os.utime(path, (mtime, mtime))

    save(last, 6, 1000.0)
    save(hpc, 4, 2000.0)  # written later, but an older state
    assert newest_checkpoint(tmp_path, checkpoints) == (last, 6)
    save(hpc, 8, 500.0)
    assert newest_checkpoint(tmp_path, checkpoints) == (hpc, 8)
    save(hpc, 6, 2000.0)
    assert newest_checkpoint(tmp_path, checkpoints) == (last, 6)  # a tie: last.ckpt


class SendSigterm(L.Callback):
    """Delivers SIGTERM to this process after the second step, as a scheduler preempting the job would."""

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == 2:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_saves_last_checkpoint_and_stops(tmp_path):
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from lseg.train.callbacks import SignalCheckpoint

    module = LSegModule(model="tiny")
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt")
    t = trainer(
        tmp_path, max_epochs=5, callbacks=[SendSigterm(), SignalCheckpoint(), checkpoint, ExportPretrained()]
    )
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SIGTERMException):
        t.fit(module, datamodule=data())
    assert t.global_step == 2  # stopped right after the step that saw the signal
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 2
    assert not (tmp_path / "model").exists()  # an interrupted run is resumed, not exported
    assert signal.getsignal(signal.SIGTERM) == previous  # handlers restored


class SigtermWhileStopping(L.Callback):
    """A second SIGTERM while the stopped run shuts down, as `scontrol requeue` kills the job's tasks
    right after rank 0 asked for the requeue."""

    def on_exception(self, trainer, pl_module, exception):
        os.kill(os.getpid(), signal.SIGTERM)


def test_a_sigterm_while_stopping_never_reaches_lightnings_handler(tmp_path, caplog):
    """Regression: once the run was stopped, Lightning's SIGTERM handler was put back before teardown;
    the requeue's kill then ran its in-handler broadcast while the ranks were tearing down (a gloo
    "Connection reset by peer" traceback on rank 0, or a hang until SIGKILL). The handlers from before
    fit come back at teardown, and nothing in between calls a collective."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from lseg.train.callbacks import SignalCheckpoint

    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt")
    callbacks = [SendSigterm(), SignalCheckpoint(), SigtermWhileStopping(), checkpoint]
    t = trainer(tmp_path, max_epochs=5, callbacks=callbacks)
    previous = signal.getsignal(signal.SIGTERM)
    with caplog.at_level(logging.INFO), pytest.raises(SIGTERMException):
        t.fit(LSegModule(model="tiny"), datamodule=data())
    assert "Received SIGTERM" not in caplog.text and not t.received_sigterm
    assert signal.getsignal(signal.SIGTERM) == previous


def test_sigterm_to_one_ddp_rank_saves_once_and_stops_every_rank(tmp_path):
    """Regression: each rank decided from its own flag, so a signal that reached one rank only sent it
    into the checkpoint barrier (or Lightning's in-handler broadcast) while the other ran its next step:
    mismatched collectives, a hang until SIGKILL. Now the ranks decide together after a step."""
    import psutil

    from tests.conftest import REPO_ROOT

    command = [
        sys.executable, "-m", "lseg.cli.main", "train", "--config", str(REPO_ROOT / "configs" / "smoke.yaml"),
        "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
        "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.max_epochs", "100",
    ]  # fmt: skip
    environment = {**os.environ, "PYTHONWARNINGS": "ignore"}
    launcher = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=environment)
    try:
        first_epoch = tmp_path / "checkpoints" / "last.ckpt"
        for _ in range(600):  # training is under way once epoch 0 saved its checkpoint (60 s at most)
            children = psutil.Process(launcher.pid).children()
            if first_epoch.is_file() and children:
                break
            assert launcher.poll() is None, launcher.stderr.read()[-3000:]
            time.sleep(0.1)
        else:
            pytest.fail("training did not reach its first epoch end in 60 s")
        children[0].send_signal(signal.SIGTERM)  # rank 1 only
        _, stderr = launcher.communicate(timeout=60)
    finally:
        if launcher.poll() is None:
            for process in psutil.Process(launcher.pid).children():
                process.kill()
            launcher.kill()
    assert stderr.count("resume with --ckpt_path last") == 1, stderr[-3000:]
    saved = torch.load(first_epoch, weights_only=False)
    assert 4 < saved["global_step"] < 400  # saved mid-run, after epoch 0
    assert not (tmp_path / "model").exists()  # an interrupted run is resumed, not exported


def test_label_augmentation_draws_one_template_per_label_and_adds_negatives(tmp_path, monkeypatch):
    templates = ["{}", "a photo of a {}.", "{} in a street scene"]
    config = load_preset("tiny").to_dict()
    config["text_encoder"]["prompt_templates"] = templates
    module = LSegModule(
        model=config, label_augmentation=True, negatives=5, negatives_column="camvid-11",
        negatives_exclude_parents=["wall", "window"],
    )  # fmt: skip
    seen = head_calls(module, monkeypatch)
    datamodule = data(batch_size=4)
    trainer(tmp_path, max_steps=4, limit_val_batches=0).fit(module, datamodule=datamodule)
    labels = datamodule.label_sets["synthetic"]
    encode = module.model.encode_text
    vocabulary = module.negative_vocabulary
    assert "wall" not in vocabulary and "window" not in vocabulary and "car" not in vocabulary
    assert "dog" in vocabulary and "pizza" in vocabulary
    negatives = encode(vocabulary)
    drawn = set()
    for _, text in seen:
        assert text.shape[0] == len(labels) + 5
        for label, row in zip(labels, text):
            matches = [i for i, t in enumerate(templates) if torch.allclose(row, encode([label], [t])[0])]
            assert len(matches) == 1  # one template, not their average
            drawn.add(matches[0])
        for row in text[len(labels) :]:  # negatives: vocabulary words, never one of the labels
            assert torch.isclose(negatives @ row, torch.tensor(1.0), atol=1e-5).any()
    assert drawn == {0, 1, 2}
    assert not torch.allclose(encode(labels), encode(labels, [templates[1]]))  # inference averages them


def partly_ignored_batch(monkeypatch, labels: list[str], size=(32, 32), key: str = "d") -> dict:
    """Two random images with random masks over `labels`, the top 8 rows of the first ignored; the
    module sees `labels` as dataset `key`'s label set."""
    torch.manual_seed(0)
    monkeypatch.setattr(LSegModule, "label_sets", property(lambda self: {key: labels}))
    monkeypatch.setattr(LSegModule, "word_alternatives", property(lambda self: {}))
    batch = {
        "image": torch.randn(2, 3, *size),
        "mask": torch.randint(0, len(labels), (2, *size)),
        "dataset": [key, key],
    }
    batch["mask"][0, :8] = 255
    return batch


def test_hard_pixel_fraction_averages_the_hardest_pixels(monkeypatch):
    labels = ["sky", "road", "car"]
    batch = partly_ignored_batch(monkeypatch, labels)
    plain, hard = (
        LSegModule("tiny", pretrained=False),
        LSegModule("tiny", pretrained=False, hard_pixel_fraction=0.25),
    )
    hard.load_state_dict(plain.state_dict())
    logits = plain.model(batch["image"], plain.model.encode_text(labels)).logits
    pixels = torch.nn.functional.cross_entropy(logits, batch["mask"], ignore_index=255, reduction="none")
    pixels = pixels[batch["mask"] != 255]
    torch.testing.assert_close(plain._loss(batch), pixels.mean())
    torch.testing.assert_close(hard._loss(batch), pixels.topk(len(pixels) // 4).values.mean())
    with pytest.raises(LSegError, match="hard_pixel_fraction"):
        LSegModule("tiny", pretrained=False, hard_pixel_fraction=0)


def test_class_balanced_weights_favour_rare_classes_and_keep_the_loss_scale():
    counts = torch.tensor([900, 100, 0])
    inverse = class_balanced_weights(counts, 1.0)
    torch.testing.assert_close(inverse[:2], torch.tensor([1 / 1.8, 1 / 0.2]))  # 1 / (frequency * 2 seen)
    root = class_balanced_weights(counts, 0.5)
    torch.testing.assert_close(root[1] / root[0], torch.tensor(3.0))  # sqrt(900 / 100)
    for weights in (inverse, root):
        mean_pixel_weight = (counts[:2] / 1000 * weights[:2]).sum()
        torch.testing.assert_close(mean_pixel_weight, torch.tensor(1.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(class_balanced_weights(counts, 0.0)[:2], torch.ones(2))


def test_class_balance_weighs_each_pixel_by_its_training_class_frequency(tmp_path, monkeypatch):
    torch.manual_seed(0)
    module = LSegModule("tiny", pretrained=False, class_balance=1.0)
    datamodule = data()
    fit = trainer(tmp_path, max_steps=1, limit_val_batches=0)
    fit.fit(module, datamodule=datamodule)
    counts = SyntheticStreetScenes(16, size=tuple(SIZE), seed=0).pixel_counts()
    assert counts.sum() == 16 * SIZE[0] * SIZE[1]
    weights = module.class_weights["synthetic"]
    torch.testing.assert_close(weights, class_balanced_weights(counts, 1.0))
    assert weights[counts.argmin()] > 1 > weights[counts.argmax()]

    labels = datamodule.label_sets["synthetic"]
    batch = partly_ignored_batch(monkeypatch, labels, key="synthetic")
    module.eval()
    logits = module.model(batch["image"], module.model.encode_text(labels)).logits
    pixels = torch.nn.functional.cross_entropy(logits, batch["mask"], ignore_index=255, reduction="none")
    valid = batch["mask"] != 255
    expected = (pixels * weights[batch["mask"].clamp(max=len(labels) - 1)])[valid].mean()
    torch.testing.assert_close(module._loss(batch), expected)
    with pytest.raises(LSegError, match="class_balance"):
        LSegModule("tiny", pretrained=False, class_balance=-1)


def test_label_augmentation_asks_a_class_as_its_word_or_an_alternative_and_one_word_once(monkeypatch):
    """Alternatives (a synonyms file's `alternatives`) are drawn per class and step; a word two classes
    share goes to one of them; no alternative is ever a negative."""
    labels, alternatives = ["car", "bus", "sky"], [["vehicle", "dog"], ["vehicle"], []]
    monkeypatch.setattr(LSegModule, "label_sets", property(lambda self: {"d": labels}))
    monkeypatch.setattr(LSegModule, "word_alternatives", property(lambda self: {"d": alternatives}))
    module = LSegModule(
        "tiny", pretrained=False, label_augmentation=True, negatives=1000, negatives_column="camvid-11"
    )
    assert "dog" in module.negative_vocabulary
    encode, templates = module.model.encode_text, module.model.text_encoder.prompt_templates
    step = {"value": 0}
    monkeypatch.setattr(LSegModule, "global_step", property(lambda self: step["value"]))
    drawn = [set() for _ in labels]
    for step["value"] in range(40):
        text = module._training_text("d")
        words = []
        for options, row, seen in zip([[w, *a] for w, a in zip(labels, alternatives)], text, drawn):
            matches = [w for w in options for t in templates if torch.allclose(row, encode([w], [t])[0])]
            assert len(matches) == 1
            words.append(matches[0])
            seen.add(matches[0])
        assert len(set(words)) == len(words)
        assert not torch.isclose(text[len(labels) :] @ encode(["dog"])[0], torch.tensor(1.0), atol=1e-5).any()
    assert drawn == [{"car", "vehicle", "dog"}, {"bus", "vehicle"}, {"sky"}]


def test_a_specs_alternatives_reach_the_steps_of_a_fit(tmp_path, monkeypatch):
    """The path a user runs: a folder dataset whose synonyms file gives alternatives, through the data
    module into `lseg train`'s loop: some step asks car as "vehicle"."""
    import numpy as np
    from PIL import Image

    root = tmp_path / "streets"
    for folder in ("images", "masks"):
        (root / folder).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(4):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), np.uint8)).save(root / "images" / f"{index}.png")
        Image.fromarray(rng.integers(0, 3, (64, 64), np.uint8)).save(root / "masks" / f"{index}.png")
    (root / "names.txt").write_text("sky\nroad\ncar\n")
    (root / "words.yaml").write_text("words: {car: car}\nalternatives: {car: [vehicle]}\n")
    module = LSegModule(model="tiny", label_augmentation=True)
    asked = head_calls(module, monkeypatch)
    spec = {"name": "folder", "root": str(root), "split": None, "synonyms": str(root / "words.yaml")}
    datamodule = data(batch_size=2, train=[spec])
    trainer(tmp_path, max_epochs=4, limit_val_batches=0).fit(module, datamodule=datamodule)
    assert len(asked) == 8
    assert datamodule.word_alternatives["folder"] == [[], [], ["vehicle"]]
    templates = module.model.text_encoder.prompt_templates
    vehicle = torch.cat([module.model.encode_text(["vehicle"], [t]) for t in templates])
    assert any(torch.isclose(vehicle @ text[2], torch.tensor(1.0), atol=1e-5).any() for _, text in asked)


def test_class_balance_with_negatives_weighs_only_the_labelled_classes(monkeypatch):
    """Negative words add logits but no targets: each pixel still weighs its own class's weight."""
    labels = ["sky", "road", "car"]
    batch = partly_ignored_batch(monkeypatch, labels)
    module = LSegModule(
        "tiny", pretrained=False, class_balance=0.5, negatives=4, negatives_column="camvid-11"
    )
    weights = torch.tensor([0.5, 1.0, 2.0])
    module.class_weights["d"] = weights
    text = module._training_text("d")
    assert len(text) == len(labels) + 4
    logits = module.model(batch["image"], text).logits
    pixels = torch.nn.functional.cross_entropy(logits, batch["mask"], ignore_index=255, reduction="none")
    valid = batch["mask"] != 255
    expected = (pixels * weights[batch["mask"].clamp(max=len(labels) - 1)])[valid].mean()
    torch.testing.assert_close(module._loss(batch), expected)


def test_anchor_alignment_pulls_labelled_pixels_onto_their_class_word(monkeypatch):
    labels = ["sky", "road", "car"]
    batch = partly_ignored_batch(monkeypatch, labels, size=(30, 34))
    plain = LSegModule("tiny", pretrained=False)
    aligned = LSegModule("tiny", pretrained=False, anchor_alignment=0.5)
    aligned.load_state_dict(plain.state_dict())
    output = plain.model(batch["image"], plain.model.encode_text(labels))
    cosines = torch.einsum("bdhw,nd->bnhw", output.pixel_embeds, output.label_embeds)  # 15 x 17 grid
    grid = batch["mask"][:, ::2, ::2]
    labelled = grid != 255
    distance = 1 - cosines.gather(1, grid.clamp(max=2)[:, None])[:, 0][labelled].mean()
    torch.testing.assert_close(aligned._loss(batch), plain._loss(batch) + 0.5 * distance)
    with pytest.raises(LSegError, match="anchor_alignment"):
        LSegModule("tiny", pretrained=False, anchor_alignment=-1)


def test_channels_last_training_computes_the_same_loss(monkeypatch):
    torch.manual_seed(0)
    monkeypatch.setattr(LSegModule, "label_sets", property(lambda self: {"d": ["sky", "road", "car"]}))
    config = {
        **load_preset("tiny").to_dict(),
        "image_encoder": {"type": "cnn", "name": "resnet10t", "pretrained": False},
    }
    batch = {
        "image": torch.randn(2, 3, 64, 64),
        "mask": torch.randint(0, 3, (2, 64, 64)),
        "dataset": ["d", "d"],
    }
    plain = LSegModule(config, pretrained=False)
    fast = LSegModule(config, pretrained=False, channels_last=True)
    fast.load_state_dict(plain.state_dict())
    conv = next(m for m in fast.model.image_encoder.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fast._loss(batch), plain._loss(batch), rtol=1e-4, atol=1e-5)


def write_folder_dataset(root, sizes, names) -> None:
    """ROOT/images/val, ROOT/masks/val, ROOT/names.txt: random images and masks (some pixels ignored)."""
    from PIL import Image

    for folder in ("images/val", "masks/val"):
        (root / folder).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index, (height, width) in enumerate(sizes):
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        mask = rng.integers(0, len(names), (height, width), dtype=np.uint8)
        mask[: height // 5] = 255
        Image.fromarray(image).save(root / "images/val" / f"{index}.png")
        Image.fromarray(mask).save(root / "masks/val" / f"{index}.png")
    (root / "names.txt").write_text("\n".join(names) + "\n")


def test_validation_scores_what_lseg_evaluate_scores(tmp_path):
    """Regression: validation scored masks resized to the model's size and padded mixed-size images
    into one batch (a ViT's attention saw the others' padding), so val/miou was not the metric
    `lseg evaluate --protocol single` reports for the same weights, and asked other words."""
    from lseg.data import build_dataset
    from lseg.evaluate.runner import evaluate_dataset

    root = tmp_path / "data"
    write_folder_dataset(
        root, [(40, 56), (56, 40), (40, 56), (30, 44), (48, 64)], ["sky", "traffic_light", "road"]
    )
    L.seed_everything(0)
    module = LSegModule("tiny", pretrained=False)
    datamodule = LSegDataModule(  # validation batches of 3 mixed-size images
        train=[{"name": "synthetic", "options": {"num_images": 4, "size": SIZE}}],
        val={"name": "folder", "root": str(root), "split": "val"},
        batch_size=6,
        num_workers=0,
        val_size=48,
    )
    validated = trainer(tmp_path).validate(module, datamodule=datamodule, verbose=False)[0]
    report = evaluate_dataset(module.model, build_dataset("folder", root, "val"), protocol="single", size=48)
    assert report.labels == datamodule.label_sets[datamodule.val_key] == ["sky", "traffic light", "road"]
    assert validated["val/miou"] == pytest.approx(report.metrics["miou"], abs=1e-6)
    assert validated["val/pixel_accuracy"] == pytest.approx(report.metrics["pixel_accuracy"], abs=1e-6)


def test_text_projection_learns_at_the_heads_rate_with_weight_decay(tmp_path):
    """The projection is trained (from zero), at the head's learning rate and decayed towards the
    plain model; the frozen text encoder still gets nothing."""
    config = {**load_preset("tiny").to_dict(), "text_projection": True}
    module = LSegModule(model=config, pretrained=False, optimizer="adamw", lr=0.002, head_lr_multiplier=3)
    settings = optimizer_settings(module, tmp_path)
    group = settings["text_projection.linear.weight"]
    assert group["initial_lr"] == pytest.approx(3 * settings["image_encoder.model.cls_token"]["initial_lr"])
    assert group["weight_decay"] > 0
    trainer(tmp_path, max_steps=3, enable_checkpointing=False).fit(module, datamodule=data())
    assert module.model.text_projection.linear.weight.abs().max() > 0


def test_frozen_stages_keep_their_weights_and_batchnorm_statistics_through_a_fit(tmp_path):
    """The first two stages of a BatchNorm CNN stay exactly as loaded (weights and running
    statistics, so Lightning's train() must not switch their BatchNorm back), the later stages learn."""
    config = {
        **load_preset("tiny").to_dict(),
        "image_encoder": {"type": "cnn", "name": "resnet10t", "pretrained": False},
    }
    module = LSegModule(model=config, pretrained=False, optimizer="adamw", lr=0.01, frozen_stages=2)
    backbone = module.model.image_encoder.model
    before = {k: v.clone() for k, v in backbone.state_dict().items() if "num_batches_tracked" not in k}
    fit = trainer(tmp_path, max_steps=3, enable_checkpointing=False, limit_val_batches=0)
    fit.fit(module, datamodule=data())
    after = backbone.state_dict()
    early = ("conv1.", "bn1.", "layer1.", "layer2.")
    changed = {k for k, v in before.items() if not torch.equal(v, after[k])}
    assert not {k for k in changed if k.startswith(early)}
    assert {"layer3.0.conv1.weight", "layer3.0.bn1.running_mean", "layer4.0.bn1.weight"} <= changed
    trainable = {n for n, p in backbone.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in backbone.named_parameters() if not n.startswith(early)}
    module.eval().train()  # as a hand-written loop would
    assert not backbone.layer2.training and not backbone.bn1.training and backbone.layer3.training


def test_feature_consistency_pulls_the_encoder_back_towards_its_maps_as_built(monkeypatch):
    labels = ["sky", "road", "car"]
    batch = partly_ignored_batch(monkeypatch, labels, size=(64, 64))  # a multiple of 32: no padding
    modules = []
    for weight in (0.0, 2.0):
        torch.manual_seed(1)
        modules.append(LSegModule("tiny", pretrained=False, feature_consistency=weight).eval())
    plain, consistent = modules
    torch.testing.assert_close(consistent._loss(batch), plain._loss(batch))  # as built: no drift
    built = copy.deepcopy(plain.model.image_encoder)
    for module in modules:
        with torch.no_grad():
            module.model.image_encoder.model.blocks[2].mlp.fc2.weight.add_(0.05)
    images = plain._images(batch)
    drift = torch.stack(
        [
            (1 - F.cosine_similarity(now, then, dim=1)).mean()
            for now, then in zip(plain.model.image_encoder(images), built(images))
        ]
    ).mean()
    assert drift > 0
    loss = consistent._loss(batch)
    torch.testing.assert_close(loss, plain._loss(batch) + 2.0 * drift)
    loss.backward()
    assert consistent.model.image_encoder.model.blocks[0].mlp.fc2.weight.grad is not None
    assert all(p.grad is None for p in consistent.reference_encoder.parameters())
    with pytest.raises(LSegError, match="feature_consistency"):
        LSegModule("tiny", pretrained=False, feature_consistency=-1)


def test_the_reference_encoder_stays_as_built_and_in_eval_mode_through_a_fit(tmp_path):
    module = LSegModule("tiny", pretrained=False, optimizer="adamw", lr=0.01, feature_consistency=1.0)
    built = {k: v.clone() for k, v in module.reference_encoder.state_dict().items()}
    encoder = {k: v.clone() for k, v in module.model.image_encoder.state_dict().items()}
    modes = []
    module.reference_encoder.register_forward_pre_hook(lambda m, _: modes.append(m.training))
    fit = trainer(tmp_path, max_steps=3, enable_checkpointing=False, limit_val_batches=0)
    fit.fit(module, datamodule=data())
    assert modes == [False] * 3
    assert all(torch.equal(v, module.reference_encoder.state_dict()[k]) for k, v in built.items())
    assert not all(torch.equal(v, module.model.image_encoder.state_dict()[k]) for k, v in encoder.items())


def test_self_training_labels_ignored_pixels_with_their_most_confident_unseen_words(monkeypatch):
    """The pseudo-labels, recomputed by hand: an ignored pixel takes its best unseen word, and per
    unseen word the more confident half of its pixels (softmax over all five words) are targets."""
    labels, unseen = ["sky", "road", "car"], ["bus", "van"]
    batch = partly_ignored_batch(monkeypatch, labels)  # 8 x 32 ignored pixels in the first image
    config = {  # a random CNN's pixel embeddings vary enough for both unseen words to win pixels
        **load_preset("tiny").to_dict(),
        "image_encoder": {"type": "cnn", "name": "resnet10t", "pretrained": False},
    }
    modules = {}
    for weight, start in ((0.0, 0), (2.0, 0), (2.0, 1)):
        torch.manual_seed(0)
        modules[weight, start] = LSegModule(
            config, pretrained=False, self_training=weight, self_training_start=start
        ).eval()
    plain, transductive, later = modules.values()
    monkeypatch.setattr(LSegModule, "unseen_labels", property(lambda self: {"d": []}))
    torch.testing.assert_close(transductive._loss(batch), plain._loss(batch))  # no unseen words: no term
    monkeypatch.setattr(LSegModule, "unseen_labels", property(lambda self: {"d": unseen}))
    logits = plain.model(batch["image"], plain.model.encode_text(labels + unseen)).logits
    probabilities = logits.softmax(dim=1)[0, :, :8].flatten(1)  # the ignored pixels, 5 words x 256
    best = probabilities[3:].argmax(dim=0) + 3
    targets, chosen = [], []
    for word in (3, 4):
        mine = (best == word).nonzero()[:, 0]
        order = probabilities[word, mine].argsort(descending=True)
        kept = mine[order[: max(1, len(mine) // 2)]]
        chosen.append(kept)
        targets += [word] * len(kept)
    assert 0 < len(chosen[0]) < 256 and 0 < len(chosen[1]) < 256  # both words win some pixels
    pixels = torch.cat(chosen)
    pseudo = F.cross_entropy(logits[0, :, :8].flatten(1)[:, pixels].T, torch.tensor(targets))
    loss = transductive._loss(batch)
    torch.testing.assert_close(loss, plain._loss(batch) + 2.0 * pseudo)
    assert pseudo > 0
    torch.testing.assert_close(later._loss(batch), plain._loss(batch))  # before self_training_start
    weight = next(transductive.model.image_encoder.parameters())
    plain_weight = next(plain.model.image_encoder.parameters())
    (gradient,), (plain_gradient,) = (
        torch.autograd.grad(loss, weight),
        torch.autograd.grad(plain._loss(batch), plain_weight),
    )
    assert not torch.allclose(gradient, plain_gradient)  # the pseudo-labels' CE trains the encoder
    with pytest.raises(LSegError, match="self_training_fraction"):
        LSegModule("tiny", pretrained=False, self_training=1.0, self_training_fraction=0)
