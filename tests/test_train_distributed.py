"""Two-process training and evaluation through torchrun on CPU (gloo): DDP and FSDP2.

Each run starts ``torchrun --standalone --nproc_per_node=2`` on a small driver that calls
``tools/train.py`` and then ``tools/eval.py`` (both through their ``main``, from
:mod:`linvision.training.cli`) and dumps every rank's metrics, so the test can check that the ranks
agree, that only rank 0 wrote files, and that the distributed numbers equal a single-process
evaluation of the saved checkpoint.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from linvision import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("red", "green", "blue")
TIMING = {"img_per_sec", "time"}

DRIVER = r'''
import json, os, sys, traceback
data, out = sys.argv[1:3]
extra = sys.argv[3:]

def run():
    from linvision.training.cli import eval_main, train_main
    common = ["--data-dir", data, "--workers", "0", "--no-progress"]
    trained = train_main(common + [
        "--model", "linvit_t", "--img-size", "32", "-b", "4", "--epochs", "2", "--warmup-epochs", "0",
        "--lr", "1e-3", "--seed", "1", "--output", out] + extra)
    evaluated = eval_main(common + ["--checkpoint", os.path.join(out, "last.safetensors"), "-b", "5"])
    rank = int(os.environ["RANK"])
    result = {"world_size": trained["world_size"], "rank": trained["rank"], "num_updates": trained["num_updates"],
              "last": trained["last"], "last_ema": trained["last_ema"], "best_top1": trained["best_top1"],
              "eval": evaluated}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f, default=str)

try:
    from linvision.training.distributed import run_then_destroy_process_group
    run_then_destroy_process_group(run)  # as the tools' __main__ does
except BaseException:
    # torchrun shows only the tail of the ranks' interleaved stderr: keep each rank's own traceback
    # (SystemExit included: the tools exit with "error: ..." on bad input).
    name = f"rank{os.environ.get('RANK', '?')}.error"
    with open(os.path.join(os.environ["LINVISION_TEST_ERRORS"], name), "w") as f:
        f.write(traceback.format_exc())
    raise
'''


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """3 colour classes, 16 train + 5 val images each (15 val images: uneven shards of 8 and 7)."""
    root = tmp_path_factory.mktemp("ddp_data")
    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("val", 5)):
        for k, c in enumerate(CLASSES):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 120, size=(20, 20, 3))
                img[..., k] += 120
                Image.fromarray(img.astype(np.uint8)).save(root / split / c / f"{i}.png")
    return root


def _torchrun(tmp_path: Path, data: Path, out: Path, *extra: str) -> list:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    errors = tmp_path / "rank_errors"
    errors.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT),
               LINVISION_TEST_ERRORS=str(errors))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(driver), str(data), str(out), *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150)
    if proc.returncode != 0:
        # The first rank to fail is the root cause; the other one usually dies of a closed connection.
        tracebacks = "".join(f"--- {p.name} ---\n{p.read_text()}\n" for p in sorted(errors.glob("*.error")))
        pytest.fail(f"torchrun exited with {proc.returncode}\n{tracebacks}--- stdout (tail) ---\n"
                    f"{proc.stdout[-3000:]}\n--- stderr (tail) ---\n{proc.stderr[-3000:]}", pytrace=False)
    # Warnings that mean wasted work on every step, or a deprecated call of ours.
    for warning in ("Grad strides do not match bucket view strides", "`broadcast_buffers` is deprecated"):
        assert warning not in proc.stderr, proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)], proc.stdout


def _without_timing(value):
    if isinstance(value, dict):
        return {k: _without_timing(v) for k, v in value.items() if k not in TIMING}
    return value


def _eval_here(out: Path, data: Path) -> dict:
    """Single-process evaluation of the run's last weights, in this process."""
    from linvision.training.cli import eval_main
    return eval_main(["--checkpoint", str(out / "last.safetensors"), "--data-dir", str(data), "--workers", "0",
                        "--no-progress", "-b", "8"])


def _check_run(results, stdout, out: Path, data: Path) -> dict:
    r0, r1 = results
    assert (r0["rank"], r1["rank"], r0["world_size"]) == (0, 1, 2)
    assert _without_timing(r0) == _without_timing(r1) | {"rank": 0}  # identical metrics on both ranks
    # 48 train images / (2 ranks x batch 4) = 6 updates per epoch.
    assert r0["num_updates"] == 12
    assert r0["eval"]["num_images"] == r0["last"]["num_images"] == 15  # every val image once, none twice
    # Only rank 0 wrote files and printed: one log line per epoch, one CSV row per epoch.
    assert stdout.count("epoch 1/2 ") == 1 and stdout.count("top-1") >= 2
    assert len((out / "summary.csv").read_text().strip().splitlines()) == 3
    assert sorted(p.name for p in out.glob("rank*.json")) == ["rank0.json", "rank1.json"]
    assert not [p for p in out.rglob("*.tmp")]
    # The distributed eval of the saved weights equals the train-time eval and a one-process eval.
    here = _eval_here(out, data)
    for m in (r0["eval"], r0["last"]):
        assert (m["top1"], m["top5"], m["num_images"]) == (here["top1"], here["top5"], here["num_images"])
        assert m["loss"] == pytest.approx(here["loss"], rel=1e-5)
    return r0


def test_ddp_two_ranks_train_and_eval(tmp_path, data):
    out = tmp_path / "ddp"
    results, stdout = _torchrun(tmp_path, data, out, "--model-ema", "--model-ema-decay", "0.9",
                                "--save-every-steps", "4", "--mixup", "0.5", "--channels-last")
    r0 = _check_run(results, stdout, out, data)
    assert "ddp, channels_last," in stdout and r0["last_ema"]["num_images"] == 15
    assert (out / "last.ema.safetensors").is_file()
    state = ckpt.load_state(out / "last_state.pth")
    assert len(state["rng"]) == 2 and state["world_size"] == 2  # every rank's RNG state is kept


def test_fsdp_two_ranks_train_eval_and_resume_in_one_process(tmp_path, data):
    out = tmp_path / "fsdp"
    # FSDP2 shards only contiguous parameters: --channels-last must leave the weights alone.
    results, stdout = _torchrun(tmp_path, data, out, "--fsdp", "--model-ema", "--model-ema-decay", "0.9",
                                "--channels-last")
    _check_run(results, stdout, out, data)
    assert "fsdp, channels_last (batches only)" in stdout
    # The checkpoint holds full (gathered) tensors: it resumes in a single process, optimizer included.
    state = ckpt.load_state(out / "last_state.pth")
    weights = ckpt.load_weights(out / "last.safetensors")
    assert set(state["optimizer"]["state"]) <= set(weights)  # optimizer state keyed by parameter name
    from linvision.training.cli import train_main
    result = train_main(["--data-dir", str(data), "--workers", "0", "--no-progress", "--model", "linvit_t",
                          "--img-size", "32", "-b", "8", "--epochs", "3", "--warmup-epochs", "0", "--seed", "1",
                          "--model-ema", "--output", str(out), "--resume", "auto"])
    assert result["epochs_run"] == 1 and result["num_updates"] == 12 + 6
    assert torch.isfinite(torch.tensor(result["last"]["loss"]))
