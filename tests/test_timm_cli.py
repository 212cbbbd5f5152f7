"""timm command lines, bulk evaluation, model-name checks, preemption, two-node torchrun and the
editable install, on a tiny generated ImageFolder. CPU, one thread, linvit_t at 32x32."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from linvision import checkpoint as ckpt
from linvision.training import cli

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("circle", "square", "stripes")
TINY = ["--model", "linvit_t", "--img-size", "32", "-b", "4", "-j", "0", "--seed", "0", "--no-progress",
        "--device", "cpu"]


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """DATA/{train,validation}/<class>/*.png: 3 classes, 8 train and 4 val images each (timm's split name)."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:16, :16]
    masks = {"circle": (yy - 8) ** 2 + (xx - 8) ** 2 < 30, "square": (abs(yy - 8) < 5) & (abs(xx - 8) < 5),
             "stripes": (xx // 2) % 2 == 0}
    for split, n in (("train", 8), ("validation", 4)):
        for c in CLASSES:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                img = masks[c][..., None] * rng.integers(80, 256, size=3) + rng.integers(0, 40, size=(16, 16, 3))
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / split / c / f"{i}.png")
    return root


# The efficientnet_b2 recipe of timm's training-script documentation, verbatim except for the sizes
# (model, batch, workers, epochs, lr) and the launcher: positional DIR, step schedule, rmsproptf,
# EMA, RandAugment, random erasing, --amp; plus the flags a timm user adds to name and keep runs.
TIMM_DOC_COMMAND = ("--model linvit_t -b 4 --sched step --epochs 2 --decay-epochs 2.4 --decay-rate .97 "
                    "--opt rmsproptf --opt-eps .001 -j 0 --warmup-lr 1e-6 --weight-decay 1e-5 --drop 0.3 "
                    "--drop-path 0.2 --model-ema --model-ema-decay 0.9999 --aa rand-m9-mstd0.5 --remode pixel "
                    "--reprob 0.2 --amp --lr .016").split()


@pytest.fixture(scope="module")
def timm_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    argv = [str(data)] + TIMM_DOC_COMMAND + [
        "--input-size", "3", "32", "32", "--output", str(out), "--experiment", "doc", "--checkpoint-hist", "1",
        "--eval-metric", "loss", "--val-interval", "1", "--log-wandb", "--no-progress", "--device", "cpu"]
    return out / "doc", cli.train_main(argv)


def test_timm_documented_command_trains_and_writes_timm_names(timm_run):
    run, result = timm_run
    assert result["epochs_run"] == 2 and result["best_metric"] == "loss"
    for name in ("args.yaml", "config.yaml", "summary.csv", "model_best.safetensors", "best.safetensors",
                 "last.safetensors", "last.ema.safetensors", "last_state.pth"):
        assert (run / name).is_file(), name
    assert os.path.samefile(run / "model_best.safetensors", run / "best.safetensors")
    assert len(list((run / "checkpoints").glob("step-*.json"))) == 1  # --checkpoint-hist 1
    import yaml
    args = yaml.safe_load((run / "args.yaml").read_text())
    assert args["opt"] == "rmsproptf" and args["input_size"] == [3, 32, 32] and args["data_dir"] is not None
    header = (run / "summary.csv").read_text().splitlines()[0].split(",")
    assert {"epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5", "lr"} <= set(header)
    # best by loss: the best file's recorded loss is the smallest evaluated
    meta = ckpt.read_weights_metadata(run / "best.safetensors")
    assert meta["eval_metric"] == "loss"
    losses = [r["eval_loss"] for r in _summary_rows(run)] + [r["eval_ema_loss"] for r in _summary_rows(run)]
    assert meta["metric_value"] == pytest.approx(min(float(x) for x in losses if x))
    # config.yaml and timm's args.yaml read back with -c
    back = cli.parse_train_args(["-c", str(run / "args.yaml")])
    assert back.opt == "rmsproptf" and back.output == str(run.parent / "doc")


def _summary_rows(run):
    import csv
    with open(run / "summary.csv") as f:
        return list(csv.DictReader(f))


def test_refused_timm_flag_says_why_and_help_shows_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse_train_args(["/data", "--aug-splits", "3", "--jsd"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.split(": ", 1)[1].startswith("error: --aug-splits is not supported: AugMix")
    help_text = cli.build_train_parser().format_help()
    for flag, default in (("--epochs EPOCHS", "300"), ("--warmup-epochs WARMUP_EPOCHS", "5")):
        block = help_text[help_text.index("\n  " + flag):][:200]
        assert f"(default: {default})" in block, flag
    args = cli.parse_train_args(["--data", "/d", "--dr", "0.5", "--val-interval", "2", "--recovery-interval", "7"])
    assert (args.data_dir, args.decay_rate, args.eval_interval, args.save_every_steps) == ("/d", 0.5, 2, 7)


def test_bulk_eval_of_checkpoint_dir_and_model_list_writes_csv(timm_run, data, tmp_path, capsys):
    run, _ = timm_run
    evaluate = cli.eval_main
    rows = evaluate([str(data), "--checkpoint", str(run), "--results-file", str(tmp_path / "r.csv"), "-j", "0",
                     "--no-progress", "--device", "cpu"])
    assert [Path(r["checkpoint"]).name for r in rows if not r.get("error")] and len(rows) == 2  # best + last
    import csv
    with open(tmp_path / "r.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["checkpoint"] for r in table] == [r["checkpoint"] for r in rows]
    assert {"model", "top1", "top1_err", "top5", "param_count", "img_size", "crop_pct"} <= set(table[0])
    (tmp_path / "models.txt").write_text("linvit_t\n# a comment\nno_such_model\n")
    rows = evaluate([str(data), "--model-list", str(tmp_path / "models.txt"), "--img-size", "32", "-j", "0",
                     "--no-progress", "--device", "cpu", "--results-file", str(tmp_path / "m.json"),
                     "--results-format", "json"])
    assert [r["model"] for r in rows] == ["linvit_t", "no_such_model"]
    assert "unknown model" in rows[1]["error"]
    assert json.loads((tmp_path / "m.json").read_text())[0]["model"] == "linvit_t"


def test_checkpoint_of_another_model_is_refused_unless_allowed(timm_run, data, tmp_path, capsys):
    run, _ = timm_run
    best = run / "best.safetensors"
    with pytest.raises(SystemExit) as e:
        cli.eval_main([str(data), "--model", "mavit_t", "--checkpoint", str(best), "--no-progress"])
    assert "written by model 'linvit_t', not 'mavit_t'" in str(e.value) and "--allow-model-mismatch" in str(e.value)
    with pytest.raises(SystemExit) as e:
        cli.train_main([str(data), "--model", "mavit_t", "--initial-checkpoint", str(best), "--epochs", "1",
                             "--output", str(tmp_path / "x"), "--img-size", "32", "--no-progress", "-j", "0"])
    assert "--initial-checkpoint" in str(e.value) and "not 'mavit_t'" in str(e.value)
    import timm
    from linvision.serialization import CheckpointError
    with pytest.raises(CheckpointError, match="written by model 'linvit_t'"):
        timm.create_model("mavit_t", pretrained=True, num_classes=3,
                          pretrained_cfg_overlay=dict(file=str(best), num_classes=3))
    # The same file into its own model, and into the other one on request.
    assert cli.eval_main([str(data), "--checkpoint", str(best), "--no-progress", "-j", "0"])["model"] == "linvit_t"
    forced = cli.eval_main([str(data), "--model", "mavit_t", "--checkpoint", str(best), "--allow-model-mismatch",
                                 "--no-progress", "-j", "0"])
    assert forced["model"] == "mavit_t"


def test_sigterm_checkpoints_exits_zero_and_resume_is_bit_exact(data, tmp_path):
    common = [str(data)] + TINY + ["--epochs", "2", "--warmup-epochs", "0", "--lr", "1e-3", "--log-interval", "1"]
    reference = cli.train_main(common + ["--output", str(tmp_path / "ref")])
    out = tmp_path / "preempted"
    proc = subprocess.Popen([sys.executable, str(ROOT / "tools" / "train.py")] + common + ["--output", str(out)],
                            cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "step 2/6" in line:
            proc.send_signal(signal.SIGTERM)
            break
    rest, _ = proc.communicate(timeout=120)
    lines += rest.splitlines(keepends=True)
    assert proc.returncode == 0, "".join(lines)
    stops = [line for line in lines if line.startswith("preempted by SIGTERM")]
    assert len(stops) == 1 and "--resume auto" in stops[0], "".join(lines)
    assert "epoch 1, batch" in stops[0]  # stopped mid-epoch, after the step in progress
    assert not list(out.rglob("*.tmp"))
    resumed = cli.train_main(common + ["--output", str(out), "--resume", "auto"])
    assert resumed["num_updates"] == reference["num_updates"] == 12
    a, b = ckpt.load_weights(tmp_path / "ref" / "last.safetensors"), ckpt.load_weights(out / "last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["history"][-1]["train_loss"] == reference["history"][-1]["train_loss"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_localhost_through_torchrun_rendezvous(data, tmp_path):
    """The documented multi-node launch (c10d rendezvous), as two one-process "nodes" on this machine."""
    port, out = _free_port(), tmp_path / "run"
    nodes = []
    for node_rank in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
               f"--node_rank={node_rank}", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
               "--rdzv_id=linvision-test", str(ROOT / "tools" / "train.py"), str(data)] + TINY + [
               "--epochs", "1", "--warmup-epochs", "0", "--lr", "1e-3", "--output", str(out)]
        nodes.append(subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    logs = [p.communicate(timeout=300)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], "\n".join(log[-3000:] for log in logs)
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch"] == 8 and summary["num_updates"] == 3
    assert sum("done: 1 epochs" in log for log in logs) == 1  # rank 0 alone reports


def test_import_from_the_folder_holding_a_clone(tmp_path):
    """`pip install -e` in compat mode (the Makefile's) imports the clone, not its folder as a namespace."""
    pytest.importorskip("setuptools")
    parent = tmp_path / "parent"
    parent.mkdir()
    (parent / "linvision").symlink_to(ROOT, target_is_directory=True)  # a clone named linvision
    prefix = tmp_path / "prefix"
    install = subprocess.run(
        # --ignore-installed: pip would otherwise uninstall this environment's own linvision first (the
        # same distribution), and a later `make demo` in this checkout would find no linvision.
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "--ignore-installed", "--prefix", str(prefix), "--config-settings", "editable_mode=compat",
         "-e", "./linvision"],
        cwd=parent, env=dict(_env(), PYTHONPATH=""), capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-2000:]
    site_dir = next(prefix.rglob("site-packages"))
    import site
    # -S: only the new install and this environment's packages (for torch/timm), in that order.
    probe = ("import site, sys; [site.addsitedir(p) for p in sys.argv[1:]]\n"
             "import importlib.util, linvision, timm\n"
             "print(linvision.__file__); print(timm.is_model('linvit_b'))")
    env = {k: v for k, v in _env().items() if k != "PYTHONPATH"}
    bare = subprocess.run([sys.executable, "-S", "-c", "import importlib.util as u; print(u.find_spec('linvision').origin)"],
                          cwd=parent, env=env, capture_output=True, text=True)
    assert bare.stdout.strip() == "None"  # without the install: the folder is an empty namespace package
    done = subprocess.run([sys.executable, "-S", "-c", probe, str(site_dir)] + site.getsitepackages(),
                          cwd=parent, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    origin, registered = done.stdout.split()
    assert Path(origin).resolve() == (ROOT / "linvision" / "__init__.py").resolve() and registered == "True"


def test_mm_backbone_init_weights_logs_one_line_outside_a_runner(capsys):
    pytest.importorskip("mmengine")
    from mmengine.logging import MMLogger

    from linvision.adapters.mm import LinVisionBackbone
    # mmengine's "current" logger is the newest instance; one made now writes to the captured stdout
    # (an instance another test made earlier holds the stream of that test's capture).
    MMLogger.get_instance("test_mm_backbone_one_line", log_level="INFO")
    backbone = LinVisionBackbone("linvit_t", init_cfg=[dict(type="Constant", layer="Conv2d", val=1.0)])
    capsys.readouterr()
    backbone.init_weights()
    captured = capsys.readouterr()
    lines = [line for line in (captured.out + captured.err).splitlines() if line.strip()]
    assert len(lines) == 1 and "set by init_cfg (ConstantInit" in lines[0], lines[:5]
