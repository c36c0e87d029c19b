"""Distributed `kiln train`: 2 processes on gloo (torchrun --standalone) against 1 process.

One torchrun launch runs every 2-process job in turn in one process group (gloo does not
come back reliably from destroy_process_group and a second init in the same process); the
1-process runs happen in this process. --batch-size is the global batch: 2 ranks x 128 against 1 x 256.
"""

import json
import os
import subprocess
import sys
import textwrap

import numba
import pytest
import torch

import kiln
from kiln.models.mlp import MLP, MLPConfig
from kiln.train import checkpoint, run
from kiln.train.data import EpochShuffler, ShardedBatches, shard_count
from kiln.train.distributed import World, transformer_blocks
from tests.numerics import BOUND, rel_err

F32 = BOUND[torch.float32]
# digits: 1257 training samples, ceil(1257 / 256) = 5 steps per epoch, the last of 233 (odd:
# the two ranks take 117 and 116, so the uneven-split weighting is exercised at step 5)
LOGISTIC = {"task": "digits", "model": "logistic", "batch_size": 256, "progress": False}

_WORKER = textwrap.dedent("""
    import json, os, sys
    rank = int(os.environ["RANK"])
    root, jobs = sys.argv[1], json.loads(sys.argv[2])
    writes = []
    if rank != 0:  # record every write of this rank under the test's folder
        def audit(event, args):
            if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
                path, mode, flags = os.fsdecode(args[0]), args[1], args[2]
                writing = any(c in mode for c in "wax+") if mode else flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
                if writing and path.startswith(root):
                    writes.append(path)
            elif event in ("os.mkdir", "os.rename", "os.replace", "os.remove") and \\
                    os.fsdecode(args[0]).startswith(root):
                writes.append(f"{event} {os.fsdecode(args[0])}")
        sys.addaudithook(audit)
    import torch.distributed as dist
    from kiln.train import run
    # one process group for every job: run.train joins the group torchrun's variables
    # describe only when none exists (`kiln train` does), and leaves a caller's own alone
    dist.init_process_group("gloo")
    for job in jobs:
        run.train(**job)
        assert dist.is_initialized()
    dist.destroy_process_group()
    print("WRITES", rank, json.dumps(writes), flush=True)
    # Leave without interpreter teardown: once, in CI, rank 1 aborted there ("terminate called
    # without an active exception", a C++ thread of torch's still joinable at exit) after every
    # job had finished and written. What these tests check is done by now; torch's own exit is not.
    os._exit(0)
""")


def _torchrun(root, jobs, timeout=600):
    worker = root / "worker.py"
    worker.write_text(_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(worker), str(root), json.dumps(jobs)],
                          env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The 1-process and 2-process runs every test below compares."""
    root = tmp_path_factory.mktemp("dist")
    threads = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(1)  # (module fixtures come before conftest's one-thread fixture)
    numba.set_num_threads(1)
    one = lambda name, **kw: run.train(**LOGISTIC, out=str(root / name), **kw)  # noqa: E731
    one("one3", max_steps=3)
    one("one7", max_steps=7)
    stdout = _torchrun(root, [
        {**LOGISTIC, "out": str(root / "two3"), "max_steps": 3},
        {**LOGISTIC, "out": str(root / "two7_from_one3"), "max_steps": 7, "resume": str(root / "one3" / "last.pt")},
        {"task": "digits", "model": "vit", "batch_size": 16, "max_steps": 2, "fsdp": True, "progress": False,
         "out": str(root / "fsdp")},
    ])
    one("one7_from_two3", max_steps=7, resume=str(root / "two3" / "last.pt"))
    torch.set_num_threads(threads[0])
    numba.set_num_threads(threads[1])
    return root, stdout


def _load(root, name):
    return checkpoint.load(root / name / "last.pt")


def _assert_same_run(got, want):
    """Same steps and position, parameters and Adam moments within float32 reduction-order bounds."""
    assert (got["step"], got["epoch"], got["trainer"]["batches_done"]) == \
        (want["step"], want["epoch"], want["trainer"]["batches_done"])
    assert got["model"].keys() == want["model"].keys()
    for key, value in want["model"].items():
        assert rel_err(got["model"][key], value) <= F32, key
    assert got["optimizer"]["param_groups"] == want["optimizer"]["param_groups"]
    for index, state in want["optimizer"]["state"].items():
        for key, value in state.items():
            assert rel_err(got["optimizer"]["state"][index][key], value) <= F32, (index, key)
    assert got["scheduler"] == want["scheduler"]
    assert torch.equal(got["rng"]["data"], want["rng"]["data"])


def test_the_ranks_of_a_step_see_the_one_process_batch():
    for num_samples, batch_size, world_size, skip in [(23, 6, 2, 0), (23, 6, 3, 12), (1257, 256, 2, 768)]:
        single = EpochShuffler(num_samples, torch.Generator().manual_seed(5))
        single.skip = skip
        order = list(single)
        expected = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        per_rank = []
        for rank in range(world_size):
            sampler = ShardedBatches(num_samples, batch_size, torch.Generator().manual_seed(5), rank, world_size)
            sampler.skip = skip
            per_rank.append(list(sampler))
            assert len(sampler) == -(-num_samples // batch_size)
        assert all(len(batches) == len(expected) for batches in per_rank)  # the same number of steps
        for step, batch in enumerate(expected):
            shares = [per_rank[r][step][:shard_count(len(batch), r, world_size)] for r in range(world_size)]
            assert sorted(i for share in shares for i in share) == sorted(batch), (num_samples, step)
            assert all(per_rank[r][step] for r in range(world_size))  # never an empty batch


def test_one_rank_of_one_process_is_the_single_process_order():
    sampler = ShardedBatches(23, 6, torch.Generator().manual_seed(1))
    order = list(EpochShuffler(23, torch.Generator().manual_seed(1)))
    assert [i for batch in sampler for i in batch] == order


def test_two_processes_of_batch_b_match_one_process_of_batch_2b(runs):
    root, _ = runs
    two, one = _load(root, "two3"), _load(root, "one3")
    _assert_same_run(two, one)
    assert two["trainer"]["world_size"] == 2 and len(two["rng_ranks"]) == 2
    assert two["trainer"]["loss_sum"] == pytest.approx(one["trainer"]["loss_sum"], rel=F32)
    assert two["trainer"]["samples"] == one["trainer"]["samples"] == 3 * 256
    # the mid-epoch row, validated by both ranks over their halves of the validation set
    assert two["trainer"]["history"][-1]["val_loss"] == pytest.approx(one["trainer"]["history"][-1]["val_loss"],
                                                                       rel=F32)
    results = json.loads((root / "two3" / "results.json").read_text())
    want = json.loads((root / "one3" / "results.json").read_text())
    assert results["world_size"] == 2 and results["steps"] == 3 and not results["fsdp"]
    assert results["test_loss"] == pytest.approx(want["test_loss"], rel=F32)


def test_checkpoints_resume_across_world_sizes(runs):
    root, _ = runs
    uninterrupted = _load(root, "one7")
    # 2 processes -> 1 process, mid-epoch, then across the end of the epoch (an uneven split)
    _assert_same_run(_load(root, "one7_from_two3"), uninterrupted)
    # 1 process -> 2 processes
    two = _load(root, "two7_from_one3")
    _assert_same_run(two, uninterrupted)
    rows, want = two["trainer"]["history"], uninterrupted["trainer"]["history"]
    assert [r["epoch"] for r in rows] == [0.6, 1, 1.4]  # the row of the stop at step 3, then this run's
    rows = rows[1:]
    assert [r["epoch"] for r in want] == [1, 1.4]
    for row, ref in zip(rows, want):
        for key in ("train_loss", "val_loss", "val_accuracy"):
            assert row[key] == pytest.approx(ref[key], rel=F32), key


def test_only_rank_0_writes_the_run_folder(runs):
    root, stdout = runs
    lines = [line.split(" ", 2) for line in stdout.splitlines() if line.startswith("WRITES")]
    assert sorted(rank for _, rank, _ in lines) == ["0", "1"]
    assert [json.loads(w) for _, rank, w in lines if rank == "1"] == [[]]
    assert sorted(os.listdir(root / "two3")) == ["confusion.png", "curves.png", "last.pt", "metrics.csv",
                                                 "misclassified.png", "results.json"]


def test_an_fsdp_checkpoint_loads_and_resumes_in_one_process(runs):
    root, _ = runs
    state = _load(root, "fsdp")
    assert state["step"] == 2 and state["trainer"]["world_size"] == 2
    model = kiln.train.load(root / "fsdp" / "last.pt")
    assert type(model).__name__ == "ViT"
    assert state["model"].keys() == model.state_dict().keys()
    assert all(type(v) is torch.Tensor for v in state["model"].values())  # gathered, not DTensors
    params = dict(model.named_parameters())
    # torch's optimizer layout, parameters by index in the model's order, full-size moments
    assert state["optimizer"]["param_groups"][0]["params"] == list(range(len(params)))
    for index, name in enumerate(params):
        assert state["optimizer"]["state"][index]["exp_avg"].shape == params[name].shape, name
    results = json.loads((root / "fsdp" / "results.json").read_text())
    assert results["fsdp"] and results["backend"] == "reference"  # the numba kernels step aside on CPU
    resumed = run.train("digits", "vit", out=str(root / "fsdp_resumed"), resume=str(root / "fsdp" / "last.pt"),
                        max_steps=3, progress=False)
    assert resumed["steps"] == 3 and resumed["world_size"] == 1
    after = _load(root, "fsdp_resumed")
    assert any(not torch.equal(after["model"][k], v) for k, v in state["model"].items())


def test_fsdp_in_one_process_is_refused_naming_the_flag(capsys, tmp_path):
    from kiln import cli

    code = cli.main(["train", "digits", "--model", "vit", "--fsdp", "--out", str(tmp_path / "x"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "--fsdp" in err and "torchrun" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_a_global_batch_the_ranks_cannot_split_is_refused():
    assert World(rank=1, size=2).local_batch_size(256) == 128
    with pytest.raises(ValueError, match="--batch-size 256 is the global batch .* multiple of 3"):
        World(rank=0, size=3).local_batch_size(256)


def test_fsdp_shards_the_blocks_of_transformers_only():
    assert transformer_blocks(MLP(MLPConfig(in_features=4, hidden=[8], out_features=2))) == []
    vit = run.get_task("digits").model_entry("vit").build()
    assert len(transformer_blocks(vit)) == vit.config.depth
