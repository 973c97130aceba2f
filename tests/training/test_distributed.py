"""Multi-process training: 2 CPU processes (gloo) under torchrun, as docs/scaling.md runs them.

Two launches of ``python -m torch.distributed.run --nproc_per_node 2 ...`` (about 10 s each on
the 2-core CI machine) serve every test of the module:

1. ``hdiff train`` (through :func:`hdiff.cli.main`, in this file run as the launched script, see
   ``_worker``) for ``STEPS`` steps at ``B`` samples per process, with ``diffusion_loss`` wrapped
   to record the batch each process trains on; then, in the same processes, a short run whose
   loss is NaN on process 1 only.
2. ``python -m hdiff.cli train --resume`` on a copy of run 1 cut back to its checkpoint at ``K``.

What "2 processes match 1 process with the same global batch" means here: the data of every step
is exactly the same global batch (checked sample by sample), and the noise draws differ, because
each process has its own noise generator. So the one-process reference run (in this pytest
process) draws its noise the way the two processes do: it splits its batch of ``2 B`` in halves
and draws the first half's noise from its own generator (which is process 0's) and the second
half's from a generator seeded like process 1's, and returns the mean of the two half-batch
losses, which is what DDP's gradient average optimises. Then the two runs are the same
computation up to float summation order: the log (loss, learning rate, held-out losses) and the
final weights agree to float tolerance, step for step. A plain one-process run with the same
global batch agrees only in distribution.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

STEPS, K, B = 20, 10, 16  # steps, checkpoint every K steps, samples per process per step
N_TRAIN = 80  # 80 mod 2B = 16 >= B: a global batch would straddle two epochs if each process cut its own order
NAN_AT = 3  # the step at which process 1's loss is NaN in the divergence run
HAVE_TENSORBOARD = find_spec("tensorboard") is not None
TIMEOUT_S = 300


def _configs():
    from hdiff.training import train_config_to_toml

    from .conftest import tiny_config

    run = {"checkpoint_every": K, "eval_every": K, "log_every": 5, "keep_checkpoints": 5,
           "log_with": "tensorboard" if HAVE_TENSORBOARD else "none"}
    cfg = tiny_config(data={"n_train": N_TRAIN}, optim={"max_steps": STEPS, "batch_size": B}, run=run)
    # no clipping: a NaN gradient would reach the weights; a checkpoint only after the NaN step
    nan = tiny_config(data={"n_train": N_TRAIN}, optim={"max_steps": 6, "batch_size": B, "grad_clip": 0.0},
                      run={"checkpoint_every": 6, "eval_every": 6, "log_every": 1})
    return cfg, train_config_to_toml(cfg), train_config_to_toml(nan)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(*args: str) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc_per_node 2 ARGS``, one thread each, killed whole on timeout."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)  # its own process group: a timeout ends the workers too
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} ran past {TIMEOUT_S} s\n{out}\n{err}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("dist")
    cfg, text, nan_text = _configs()
    (root / "train.toml").write_text(text)
    (root / "nan.toml").write_text(nan_text)
    a, b = root / "a", root / "b"
    spec = {"record": str(root), "cli": ["train", "--config", str(root / "train.toml"), "--out", str(a)],
            "nan": {"config": str(root / "nan.toml"), "out": str(root / "nan"), "at": NAN_AT}}
    (root / "spec.json").write_text(json.dumps(spec))
    first = _launch(__file__, str(root / "spec.json"))
    assert first.returncode == 0, first.stdout + first.stderr
    _cut_back(a, b)
    second = _launch("-m", "hdiff.cli", "train", "--config", str(root / "train.toml"), "--out", str(b), "--resume")
    assert second.returncode == 0, second.stdout + second.stderr
    return SimpleNamespace(root=root, cfg=cfg, a=a, b=b, first=first, second=second)


def _cut_back(run: Path, copy: Path) -> None:
    """``copy``: the finished ``run`` as it was on disk right after its checkpoint at step ``K``."""
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "checkpoints" / f"step_{STEPS:06d}")
    for name in ("model", "model_raw", "scheduler", "snapshots"):
        shutil.rmtree(copy / name, ignore_errors=True)
    for name in ("train_meta.json", "pipeline.json"):
        (copy / name).unlink()


def _records(out: Path) -> list[dict]:
    """The log's records, every line parsed strictly (a torn or interleaved line fails)."""
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def _global_batches(cfg) -> list[list[int]]:
    """The sample indices of every step's global batch in a one-process run with batch ``2 B``."""
    from hdiff.training.data import StepBatchSampler

    return list(StepBatchSampler(cfg.data.n_train, 2 * B, seed=cfg.run.seed, count=STEPS))


def test_each_process_trains_on_a_disjoint_shard_of_every_global_batch(runs) -> None:
    from hdiff.training import GHMDataset

    cfg = runs.cfg
    train_set, _ = GHMDataset.split(cfg.ghm.build(), cfg.data.n_train, cfg.data.n_heldout, seed=cfg.data.data_seed)
    shards = [torch.load(runs.root / f"batches_{rank}.pt") for rank in (0, 1)]
    assert all(s.shape == (STEPS, B, 8) for s in shards)
    for step, idx in enumerate(_global_batches(cfg)):
        assert len(set(idx)) == 2 * B  # distinct samples: process 0 gets the first half, process 1 the second
        assert torch.equal(shards[0][step], train_set.tokens[idx[:B]]), step
        assert torch.equal(shards[1][step], train_set.tokens[idx[B:]]), step


def test_two_processes_train_like_one_process_with_the_global_batch(runs, tmp_path, monkeypatch) -> None:
    from safetensors.torch import load_file

    import hdiff.training.trainer as trainer
    from hdiff.training import train
    from hdiff.training.data import stream_seed

    cfg = runs.cfg.replace(**{"optim.batch_size": 2 * B, "run.log_with": "none"})
    real, seen = trainer.diffusion_loss, []
    second = torch.Generator().manual_seed(stream_seed(cfg.run.seed, trainer._NOISE_STREAM + 1))  # process 1's

    def as_two_processes(model, x0, process, *, generator, **kw):
        seen.append(x0.clone())
        return (real(model, x0[:B], process, generator=generator, **kw)
                + real(model, x0[B:], process, generator=second, **kw)) / 2

    monkeypatch.setattr(trainer, "diffusion_loss", as_two_processes)
    train(cfg, tmp_path / "one", progress=False)
    shards = [torch.load(runs.root / f"batches_{rank}.pt") for rank in (0, 1)]
    assert torch.equal(torch.stack(seen), torch.cat(shards, dim=1))  # the same global batch at every step
    one, two = _records(tmp_path / "one"), _records(runs.a)
    assert [r["step"] for r in one] == [r["step"] for r in two] == [5, 10, 15, 20]
    for r1, r2 in zip(one, two):
        assert r1.keys() == r2.keys()
        for k in r1.keys() - {"step", "time"}:
            assert r2[k] == pytest.approx(r1[k], rel=1e-5, abs=1e-7), (r1["step"], k)
    for weights in ("model", "model_raw"):
        w1 = load_file(tmp_path / "one" / weights / "diffusion_pytorch_model.safetensors")
        w2 = load_file(runs.a / weights / "diffusion_pytorch_model.safetensors")
        assert w1.keys() == w2.keys()
        for name in w1:
            torch.testing.assert_close(w2[name], w1[name], rtol=1e-4, atol=1e-5, msg=f"{weights}/{name}")
    one_meta, two_meta = (json.loads((d / "train_meta.json").read_text()) for d in (tmp_path / "one", runs.a))
    assert (one_meta["num_processes"], two_meta["num_processes"]) == (1, 2)
    assert one_meta["global_batch_size"] == two_meta["global_batch_size"] == 2 * B


def test_checkpoints_of_two_processes_resume_in_two_processes_bit_identically(runs) -> None:
    from safetensors.torch import load_file

    saved = runs.a / "checkpoints" / f"step_{K:06d}"
    marker = json.loads((saved / "hdiff_state.json").read_text())
    assert marker["num_processes"] == 2
    states = [json.loads((saved / f"hdiff_process_{rank}.json").read_text()) for rank in (0, 1)]
    assert states[0]["noise_rng"] != states[1]["noise_rng"]  # each process's own noise generator is saved
    # the resumed run ends where the uninterrupted one did, to the bit
    for rel in ("model/diffusion_pytorch_model.safetensors", "model_raw/diffusion_pytorch_model.safetensors",
                f"checkpoints/step_{STEPS:06d}/model.safetensors", f"checkpoints/step_{STEPS:06d}/hdiff_ema.safetensors"):
        wa, wb = load_file(runs.a / rel), load_file(runs.b / rel)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), rel
    for rank in (0, 1):  # and so do both processes' noise generators and counters (but the wall time)
        fa, fb = (json.loads((d / "checkpoints" / f"step_{STEPS:06d}" / f"hdiff_process_{rank}.json").read_text())
                  for d in (runs.a, runs.b))
        assert {k: v for k, v in fa.items() if k != "elapsed"} == {k: v for k, v in fb.items() if k != "elapsed"}
    strip = lambda records: [{k: v for k, v in r.items() if k != "time"} for r in records]  # noqa: E731
    assert strip(_records(runs.b)) == strip(_records(runs.a))
    meta_a, meta_b = (json.loads((d / "train_meta.json").read_text()) for d in (runs.a, runs.b))
    assert {k: v for k, v in meta_a.items() if k != "time_s"} == {k: v for k, v in meta_b.items() if k != "time_s"}


def test_a_two_process_checkpoint_resumes_in_one_process_on_the_same_schedule(runs, tmp_path) -> None:
    from hdiff.training import train

    _cut_back(runs.a, tmp_path / "c")
    train(runs.cfg, tmp_path / "c", resume=True, progress=False)
    # the learning rate is a function of the step, whatever the number of processes (the data and the
    # noise of steps K+1... are those of one process with batch B now, so the losses are not compared)
    one, two = _records(tmp_path / "c"), _records(runs.a)
    assert [r["step"] for r in one] == [r["step"] for r in two]
    assert [r["lr"] for r in one] == pytest.approx([r["lr"] for r in two], rel=1e-9, abs=1e-12)
    meta = json.loads((tmp_path / "c" / "train_meta.json").read_text())
    assert (meta["steps"], meta["num_processes"], meta["global_batch_size"]) == (STEPS, 1, B)


def test_only_the_main_process_writes_logs_and_reports(runs) -> None:
    for launch, out in ((runs.first, runs.a), (runs.second, runs.b)):
        reports = [line for line in launch.stdout.splitlines() if line.startswith("trained ")]
        assert len(reports) == 1 and reports[0].startswith(f"trained {STEPS} steps") and str(out) in reports[0]
    records = _records(runs.a)  # one writer: each record once, whole lines, in step order
    assert [r["step"] for r in records] == [5, 10, 15, 20]
    assert all("heldout_loss" in r for r in records if r["step"] % K == 0)
    meta = json.loads((runs.a / "train_meta.json").read_text())
    assert (meta["steps"], meta["num_processes"], meta["global_batch_size"]) == (STEPS, 2, 2 * B)
    assert meta["final_loss"] == records[-1]["loss"]
    assert not [p for p in runs.a.rglob("*") if p.name.startswith((".tmp", ".view_"))]  # no leftover temporaries
    if HAVE_TENSORBOARD:  # the tracker writes from the main process only: one event file of the training scalars
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = sorted((runs.a / "tracking" / "hdiff").glob("events.out.tfevents.*"))
        assert len(events) == 1, events
        acc = EventAccumulator(str(events[0]))
        acc.Reload()
        assert [(e.step, e.value) for e in acc.Scalars("loss")] == [
            (r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in records]


def test_a_nan_loss_on_one_process_stops_every_process_before_the_weights(runs) -> None:
    results = [json.loads((runs.root / f"nan_{rank}.json").read_text()) for rank in (0, 1)]
    for r in results:
        assert r["raised"] == "TrainingDiverged", results
        assert f"at step {NAN_AT}" in r["message"] and "training loss" in r["message"], results
    assert "is nan" in results[1]["message"]
    assert "another process" in results[0]["message"]


def test_global_batch_shards_cut_the_one_process_order() -> None:
    """In-process: accelerate's sharding of the trainer's batch sampler, for several sizes, at a resume offset."""
    from accelerate.data_loader import BatchSamplerShard

    from hdiff.training.data import StepBatchSampler
    from hdiff.training.trainer import _GlobalBatchShards

    for n, b, procs, start in ((80, 16, 2, 0), (96, 32, 3, 5), (100, 7, 2, 3), (64, 8, 4, 0), (50, 5, 1, 2)):
        steps = 3 * n // (b * procs) + 1  # a few epochs
        one = list(StepBatchSampler(n, b * procs, seed=7, start=start, count=steps))
        shards = [list(BatchSamplerShard(_GlobalBatchShards(n, b, procs, seed=7, start=start, count=steps),
                                         num_processes=procs, process_index=i)) for i in range(procs)]
        assert all(len(s) == steps for s in shards)
        for step in range(steps):
            parts = [s[step] for s in shards]
            assert all(len(p) == b for p in parts)
            assert sum(parts, []) == one[step]  # shards in process order are the one-process global batch
            assert len(set(one[step])) == b * procs  # and disjoint
    # one process: exactly the StepBatchSampler order of before
    assert list(_GlobalBatchShards(80, 16, 1, seed=3, start=2, count=9)) == list(
        StepBatchSampler(80, 16, seed=3, start=2, count=9))


def test_a_global_batch_larger_than_the_training_set_is_refused() -> None:
    from hdiff.training.trainer import _check_processes

    from .conftest import tiny_config

    cfg = tiny_config(data={"n_train": 48}, optim={"batch_size": 32})
    _check_processes(cfg, 1)
    with pytest.raises(ValueError, match=r"data.n_train \(48\).*optim.batch_size \(32\) x 2 processes = 64"):
        _check_processes(cfg, 2)
    _check_processes(cfg.replace(**{"data.fresh": True}), 2)  # fresh data draws every sample anew


def _worker(spec_path: str) -> int:
    """One process of a launch (this file run by torchrun): ``hdiff train`` recording its batches, then a NaN run."""
    import hdiff.cli
    import hdiff.training.trainer as trainer
    from hdiff.training import load_train_config, train

    spec = json.loads(Path(spec_path).read_text())
    rank, real = int(os.environ["RANK"]), trainer.diffusion_loss
    seen: list[torch.Tensor] = []
    nan_at = [0]  # the call at which process 1's loss becomes NaN (0: never)

    def recording(model, x0, process, **kw):
        seen.append(x0.detach().cpu().clone())
        loss = real(model, x0, process, **kw)
        return loss * float("nan") if rank == 1 and len(seen) == nan_at[0] else loss

    trainer.diffusion_loss = recording
    code = hdiff.cli.main(spec["cli"])
    torch.save(torch.stack(seen), Path(spec["record"]) / f"batches_{rank}.pt")
    seen.clear()
    nan_at[0] = spec["nan"]["at"]
    try:
        train(load_train_config(spec["nan"]["config"]), spec["nan"]["out"], progress=False)
        result = {"raised": None, "message": ""}
    except Exception as e:  # noqa: BLE001 - recorded for the test to judge
        result = {"raised": type(e).__name__, "message": str(e)}
    (Path(spec["record"]) / f"nan_{rank}.json").write_text(json.dumps(result))
    import torch.distributed as dist

    if dist.is_initialized():  # close the group while both processes are alive: exiting with it open
        dist.barrier()          # let gloo's threads abort the interpreter's teardown now and then (SIGABRT)
        dist.destroy_process_group()
    return code


if __name__ == "__main__":
    exit_code = _worker(sys.argv[1])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)  # every record is on disk: skip the teardown where the abort was seen
