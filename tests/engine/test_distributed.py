"""DDP on the CPU: 2 gloo processes on 127.0.0.1 train tiny synthetic runs through the real app (``fl_rpn.cli.train``).

Each rank is ``ddp_worker.py`` run as a script by ``launch_ddp`` (``conftest.py``) with torchrun's environment
variables set by hand, so the ranks can start with different Hydra run directories. The worker records the
weights after every optimizer step (and the gradients of the first) through a global optimizer hook.

Exact comparison with one process: the reference trains one process on the same 2-image global batches
(rank 0's image, then rank 1's). What makes the two runs the same computation:

- the focal RPN's normaliser N_pos is all-reduced (``FocalLossRPN.focal_normalizer``): rank r divides its
  sum by the mean count, so DDP's averaged gradient is that of the global sum over the global N_pos;
- every other loss is a mean over a per-image sample of fixed size (256 anchors per image for the sampled RPN,
  ``box_batch_size_per_image`` RoIs), so the mean over ranks of per-rank means is the global mean;
- which anchors / RoIs are sampled would still depend on each process's random stream (``torch.randperm`` per
  image, one generator per process). Both runs therefore use a sampler that takes the first positives and
  negatives by index (``first_k_sample``): same sample sizes as torchvision's, no randomness. Nothing else in
  the step depends on random numbers (flips are seeded per image; the model is initialised by rank 0's seed
  and broadcast by DDP, and the reference uses that seed).
"""

import itertools
import json
import shutil

import pytest
import torch
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler

from fl_rpn.engine.distributed import DistInfo, any_rank, first_host, launched_by
from fl_rpn.engine.stream import TrainStream

from .conftest import DDP_TINY, launch_ddp, train_with
from .ddp_worker import NORMALIZER_CASES, StepRecorder, boxpos_rpn, first_k_sample, loss_only_rpn, normalizer_inputs


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, module_cache):
    """4 iterations on 2 processes, evaluated; rank 1 gets no run directory of its own (it must use rank 0's)."""
    tmp = tmp_path_factory.mktemp("ddp")
    run_dir = tmp / "run"
    overrides = [*DDP_TINY, "eval.evaluators=[coco,proposal_recall]"]
    _, outputs, records = launch_ddp(
        tmp, "launch", module_cache, overrides, rank_overrides={"0": [f"hydra.run.dir={run_dir}"]}
    )
    return {"tmp": tmp, "run_dir": run_dir, "overrides": overrides, "outputs": outputs, "records": records}


# -- (a) ranks stay in sync, and only rank 0 writes ------------------------------------------------------------------
def test_ranks_hold_identical_weights_after_every_step(ddp_run):
    rank0, rank1 = ddp_run["records"]
    assert len(rank0["weights"]) == len(rank1["weights"]) == 4
    for step, (w0, w1) in enumerate(zip(rank0["weights"], rank1["weights"]), 1):
        assert torch.equal(w0, w1), f"step {step}: max |w0 - w1| = {(w0 - w1).abs().max()}"
    assert not torch.equal(rank0["weights"][0], rank0["weights"][-1])  # it did train


def test_rank_zero_alone_writes_into_its_run_directory(ddp_run):
    run_dir = ddp_run["run_dir"]
    assert {p.name for p in run_dir.iterdir()} >= {".hydra", "tb", "last.pt", "metrics.json", "history.json"}
    assert not list((ddp_run["tmp"] / "launch" / "cwd1").iterdir()), "rank 1 wrote files of its own"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["provenance"]["world_size"] == 2
    assert metrics["train/iterations"] == 4
    history = json.loads((run_dir / "history.json").read_text())
    assert history[-1]["lr"] == pytest.approx(0.02 * 2 / 16)  # the linear scaling rule, global batch 2 of 16


def test_rank_zero_alone_logs_the_data_summary(ddp_run):
    """The data check's per-split counts are logged once, by rank 0 (rank 1 logs to stdout without timestamps)."""
    rank0, rank1 = ddp_run["outputs"]
    for line in ("dataset.train: 6 images", "dataset.val: 3 images", "train: 6 images, val: 3 images"):
        assert rank0.count(line) == 1 and line not in rank1, line


def test_distributed_evaluation_counts_each_image_once(ddp_run, module_cache, compose_cfg, monkeypatch):
    """3 val images on 2 ranks: the DistributedSampler pads rank 1 with a repeat, which the evaluators drop."""
    from fl_rpn.data import build_dataset
    from fl_rpn.engine.checkpoint import model_from_checkpoint
    from fl_rpn.engine.evaluate import run_evaluation

    monkeypatch.setenv("FL_RPN_CACHE", str(module_cache))
    cfg = compose_cfg(*ddp_run["overrides"], f"output_dir={ddp_run['tmp'] / 'eval'}")
    model, _ = model_from_checkpoint(ddp_run["run_dir"] / "last.pt")
    single = run_evaluation(cfg, model, build_dataset(cfg.dataset.val, train=False), torch.device("cpu"), DistInfo())
    distributed = json.loads((ddp_run["run_dir"] / "metrics.json").read_text())
    assert single and all(k in distributed for k in single)
    for k, v in single.items():
        assert distributed[k] == pytest.approx(v, abs=1e-9, nan_ok=True), k


# -- (b) one DDP step is one single-process step over the same global batch ---------------------------------------
class GlobalBatchStream:
    """Stands in for ``TrainStream`` in one process: iteration i yields rank 0's and rank 1's batches i, joined."""

    def __init__(self, dataset, batch_size, seed, group_aspect_ratio):
        half = batch_size // 2
        self.ranks = [TrainStream(dataset, half, 0, seed, group_aspect_ratio, DistInfo(r, 2)) for r in (0, 1)]

    def from_iteration(self, iteration):
        for (images0, targets0), (images1, targets1) in zip(*(s.from_iteration(iteration) for s in self.ranks)):
            yield images0 + images1, targets0 + targets1


@pytest.mark.parametrize("rpn", ["focal_softmax", "focal_sigmoid", "sampled"])
def test_first_step_equals_one_process_on_the_global_batch(
    rpn, ddp_run, module_cache, compose_cfg, monkeypatch, tmp_path
):
    if rpn == "focal_softmax":  # the shared run's default
        ddp, ddp_dir = ddp_run["records"][0], ddp_run["run_dir"]
    else:
        ddp_dir = tmp_path / "ddp_run"
        overrides = [*DDP_TINY, f"rpn={rpn}", "schedule.max_iters=1"]
        ddp = launch_ddp(tmp_path, "ddp", module_cache, overrides, rank_overrides={"0": [f"hydra.run.dir={ddp_dir}"]})[
            2
        ][0]
    monkeypatch.setenv("FL_RPN_CACHE", str(module_cache))
    monkeypatch.setattr(BalancedPositiveNegativeSampler, "__call__", first_k_sample)
    recorder = StepRecorder()
    single_dir = tmp_path / "single"
    cfg = compose_cfg(*DDP_TINY, f"rpn={rpn}", "batch_size=2", "schedule.max_iters=1", f"output_dir={single_dir}")

    def global_batches(state):
        state.stream = GlobalBatchStream(state.train_set, cfg.batch_size, cfg.seed, cfg.group_aspect_ratio)

    try:
        train_with(cfg, global_batches)
    finally:
        recorder.handle.remove()

    torch.testing.assert_close(ddp["first_grads"], recorder.first_grads, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ddp["weights"][0], recorder.weights[0], rtol=1e-5, atol=1e-7)
    ddp_losses = json.loads((ddp_dir / "history.json").read_text())[0]  # mean over ranks
    single_losses = json.loads((single_dir / "history.json").read_text())[0]
    for k in ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss", "lr"):
        assert ddp_losses[k] == pytest.approx(single_losses[k], rel=1e-5), k
    if rpn != "sampled":  # the logged normaliser is the global count N_pos, whatever the number of ranks
        assert ddp_losses["rpn/focal_normalizer"] == pytest.approx(single_losses["rpn/focal_normalizer"], rel=1e-6)


# -- (c) DDP checkpoints resume, on 2 processes and on 1 ------------------------------------------------------------
def test_ddp_checkpoint_resumes_on_two_processes_and_on_one(ddp_run, module_cache, compose_cfg, monkeypatch, tmp_path):
    from fl_rpn.engine.checkpoint import load_checkpoint
    from fl_rpn.engine.trainer import train

    run_dir = tmp_path / "run"
    launch_ddp(tmp_path, "first", module_cache, [*DDP_TINY, "schedule.max_iters=2", f"hydra.run.dir={run_dir}"])
    shutil.copytree(run_dir, tmp_path / "single")
    # rank 1 is told no run directory: it must resume from rank 0's
    launch_ddp(
        tmp_path,
        "resumed",
        module_cache,
        [*DDP_TINY, "resume=true"],
        rank_overrides={"0": [f"hydra.run.dir={run_dir}"]},
    )
    resumed = load_checkpoint(run_dir / "last.pt")
    straight = load_checkpoint(ddp_run["run_dir"] / "last.pt")  # the same 4 iterations without a stop
    assert resumed["iteration"] == straight["iteration"] == 4 and len(resumed["rng"]) == 2
    for k in straight["model"]:
        torch.testing.assert_close(resumed["model"][k], straight["model"][k], rtol=0, atol=1e-6, msg=k)
    assert [h["iteration"] for h in json.loads((run_dir / "history.json").read_text())] == [1, 2, 3, 4]

    # on one process with the same per-process batch: the global batch halves, and so does the lr
    monkeypatch.setenv("FL_RPN_CACHE", str(module_cache))
    train(compose_cfg(*DDP_TINY, "resume=true", f"output_dir={tmp_path / 'single'}"))
    single = load_checkpoint(tmp_path / "single" / "last.pt")
    assert single["iteration"] == 4 and all(torch.isfinite(v).all() for v in single["model"].values())
    history = json.loads((tmp_path / "single" / "history.json").read_text())
    ddp_history = json.loads((ddp_run["run_dir"] / "history.json").read_text())
    assert [h["iteration"] for h in history] == [1, 2, 3, 4]  # 1, 2 logged by the 2-process segment
    assert history[1]["lr"] == pytest.approx(ddp_history[1]["lr"])
    assert history[2]["lr"] == pytest.approx(ddp_history[2]["lr"] / 2)


# -- a non-finite loss on one rank: every rank takes the same decision ----------------------------------------------
@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_nonfinite_loss_on_one_rank_does_not_deadlock(tmp_path, module_cache, mode):
    run_dir = tmp_path / "run"
    overrides = [*DDP_TINY, "schedule.max_iters=2", f"nonfinite={mode}", f"hydra.run.dir={run_dir}"]
    codes, outputs, records = launch_ddp(tmp_path, "nan", module_cache, overrides, nan_on_rank=1, check=mode == "skip")
    if mode == "stop":
        assert codes[0] != 0 and codes[1] != 0
        assert "NonFiniteLossError: non-finite loss on another rank at iteration 0" in outputs[0]
        assert "NonFiniteLossError: non-finite loss on rank 1 at iteration 0" in outputs[1]
    else:
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["train/skipped_steps"] == 1 and metrics["train/iterations"] == 2
        assert len(records[0]["weights"]) == len(records[1]["weights"]) == 1
        assert torch.equal(records[0]["weights"][0], records[1]["weights"][0])


# -- pieces, without processes ------------------------------------------------------------------------------------
def test_launcher_environments():
    assert launched_by({}) == (0, 1, 0, "env://")
    torchrun = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2"}
    assert launched_by(torchrun) == (3, 8, 1, "env://")
    srun = {
        "SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "16", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "4242",
        "SLURM_STEP_ID": "0", "SLURM_STEP_NODELIST": "gpu-a[017-018]", "SLURM_JOB_NODELIST": "gpu-a[017-018]",
    }  # fmt: skip
    rank, world, local, init = launched_by(srun)
    assert (rank, world, local) == (5, 16, 1) and init.startswith("tcp://gpu-a017:")
    assert 20000 <= int(init.rsplit(":", 1)[1]) < 60000 and launched_by(srun) == (rank, world, local, init)
    assert launched_by({**srun, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400"})[3] == "tcp://10.0.0.1:29400"
    batch_script = {"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "4242"}  # sbatch, no srun
    assert launched_by(batch_script) == (0, 1, 0, "env://")
    local = {
        "SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_GLOBALID": "1", "SUBMITIT_LOCAL_LOCALID": "1",
        "SUBMITIT_LOCAL_NTASKS": "2", "SUBMITIT_LOCAL_JOB_ID": "31337",
    }  # fmt: skip
    assert launched_by(local) == (1, 2, 1, f"tcp://127.0.0.1:{20000 + 31337 % 40000}")
    assert any_rank([torch.tensor(False), True], DistInfo()) == [False, True]


@pytest.mark.parametrize(
    "nodelist, host", [("node7", "node7"), ("gpu[03-05,9]", "gpu03"), ("a1,b2", "a1"), ("dgx-[12,14],cpu1", "dgx-12")]
)
def test_first_host_of_a_slurm_nodelist(nodelist, host):
    assert first_host(nodelist) == host


class _Shapes(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.ratios = [(0.5, 1.0, 2.0)[i % 3] for i in range(n)]

    def __len__(self) -> int:
        return len(self.ratios)

    def __getitem__(self, index):
        return torch.zeros(1), {"image_id": index}

    def aspect_ratios(self) -> list[float]:
        return self.ratios


def test_a_rank_resumes_its_stream_where_it_stopped():
    """Each rank's batch at iteration i is the i-th of its own endless stream, whatever the ranks' group buffers."""
    for rank in (0, 1):
        stream = TrainStream(_Shapes(20), 2, 0, 0, True, DistInfo(rank, 2))
        ids = [[t["image_id"] for t in targets] for _, targets in itertools.islice(stream.from_iteration(0), 30)]
        assert all(len(batch) == 2 for batch in ids)
        for i in range(0, 30, 3):
            assert [t["image_id"] for t in next(stream.from_iteration(i))[1]] == ids[i], (rank, i)


def test_every_trainable_parameter_gets_a_gradient(compose_cfg):
    """So DDP needs no ``find_unused_parameters``, with either RPN and with an image without boxes."""
    from fl_rpn.modeling.model import build_model

    images = [torch.rand(3, 96, 128), torch.rand(3, 96, 128)]
    targets = [
        {"boxes": torch.tensor([[10.0, 20.0, 60.0, 80.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    for rpn in ("sampled", "focal_sigmoid", "focal_softmax"):
        model = build_model(compose_cfg(f"rpn={rpn}", "model.detector.min_size=96", "model.detector.max_size=128"), 2)
        sum(model(images, targets).values()).backward()
        unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not unused, (rpn, unused)


def test_the_ddp_loss_equals_one_process_whatever_the_number_of_positives(normalizer_records):
    """DDP averages over ranks: the mean of the ranks' losses must be the one-process loss over the global batch,
    also when the global batch has fewer positives than ranks, or none (the clamp to >= 1 is global)."""
    records = normalizer_records
    for form in ("sigmoid", "softmax", "softmax_npos_ema"):  # the last: rpn.npos_ema averages the global counts
        rpn = loss_only_rpn(form.removesuffix("_npos_ema"), npos_ema=0.9 if "npos_ema" in form else None)
        for case, counts in NORMALIZER_CASES.items():
            parts = [
                normalizer_inputs(num_pos, rank, form.removesuffix("_npos_ema")) for rank, num_pos in enumerate(counts)
            ]
            objectness, deltas = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
            single = rpn.compute_loss(objectness, deltas, [p[2] for p in parts], [p[3].double() for p in parts])
            ddp_mean = (records[0][form, case] + records[1][form, case]) / 2
            torch.testing.assert_close(ddp_mean, torch.stack(single), rtol=1e-12, atol=0, msg=f"{form} {case}")
            if "npos_ema" in form:  # every rank logs the same average of the global counts 5, 1, 1 (clamped)
                assert records[0][form, case, "stats"]["npos_ema"] == records[1][form, case, "stats"]["npos_ema"]
    assert records[0]["softmax_npos_ema", "none", "stats"]["npos_ema"] == pytest.approx(
        (0.81 * 0.1 * 5 + 0.09 * 1 + 0.1 * 1) / (1 - 0.9**3), rel=1e-6
    )


def test_the_sampled_rpn_with_the_positives_box_normaliser_counts_over_all_ranks(normalizer_records):
    """``BoxPositivesRPN`` (rpn=sampled_boxpos) divides each rank's box sum by 2 max(1, N_pos) over the world size,
    N_pos of the global batch, so the mean over ranks is the one-process box loss of the global batch."""
    rpn = boxpos_rpn()
    for case, counts in NORMALIZER_CASES.items():
        parts = [normalizer_inputs(num_pos, rank, "sigmoid") for rank, num_pos in enumerate(counts)]
        objectness, deltas = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        _, single = rpn.compute_loss(objectness, deltas, [p[2] for p in parts], [p[3].double() for p in parts])
        ddp_mean = (normalizer_records[0]["boxpos", case] + normalizer_records[1]["boxpos", case]) / 2
        torch.testing.assert_close(ddp_mean, single, rtol=1e-12, atol=0, msg=case)
    assert normalizer_records[0]["boxpos", "both_ranks"] > 0


@pytest.fixture(scope="module")
def normalizer_records(tmp_path_factory, module_cache):
    return launch_ddp(tmp_path_factory.mktemp("normalizer"), "normalizer", module_cache, [], kind="normalizer")[2]


def test_the_logged_normalizer_and_easy_negative_share_are_global_on_every_rank(normalizer_records):
    """``rpn/focal_normalizer`` is max(1, N_pos) of the global batch (not that over the world size), and
    ``rpn/easy_negative_loss_share`` the ratio of the global sums (not a mean of the ranks' ratios)."""
    from fl_rpn.modeling.diagnostics import EASY_LOGIT
    from fl_rpn.modeling.losses import sigmoid_focal_loss

    for form in ("sigmoid", "softmax"):
        for case, counts in NORMALIZER_CASES.items():
            easy, total = [], []
            for rank, num_pos in enumerate(counts):
                objectness, _, labels, _ = normalizer_inputs(num_pos, rank, form)
                logit = objectness[:, -1] - objectness[:, 0] if form == "softmax" else objectness[:, 0]
                loss = sigmoid_focal_loss(logit, labels == 1, valid=labels >= 0)
                easy.append(loss[(labels == 0) & (logit < EASY_LOGIT)].sum().item())
                total.append(loss.sum().item())
            share = sum(easy) / sum(total)
            for rank in range(2):
                stats = normalizer_records[rank][form, case, "stats"]
                assert stats["focal_normalizer"] == max(1, sum(counts)), (form, case, rank)  # 5, 1, 1
                assert stats["easy_negative_loss_share"] == pytest.approx(share, rel=1e-6), (form, case, rank)
            if case == "both_ranks":  # here the mean of the ranks' ratios is 7 % (sigmoid) off the global ratio
                per_rank_mean = sum(e / t for e, t in zip(easy, total)) / 2
                assert abs(per_rank_mean - share) > 0.02 * share, form
