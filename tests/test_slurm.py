"""The Slurm launchers' dry run: rendezvous and rank arithmetic of the per-node torchrun commands.

``DRY_RUN=1`` makes ``scripts/slurm/sbatch_*.sh`` print, one line per node, the exact command that node's
srun task would run (``[node R/N HOST] python -m torch.distributed.run --node-rank R ...``) and launch
nothing, so these tests need no Slurm. The environment is rebuilt from scratch for each run so that a real
Slurm job around the test suite cannot leak its ``SLURM_*`` variables in.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SLURM = ROOT / "scripts" / "slurm"
SINGLE = SLURM / "sbatch_single_node.sh"
MULTI = SLURM / "sbatch_multi_node.sh"
CONFIG = ROOT / "configs" / "tsp_paper_7b.yaml"
NODE_LINE = re.compile(r"^\[node (\d+)/(\d+) (\S+)\] (.+)$")
EXTRA = ("--train-iters", "100", "--lr", "1e-4", "--wandb-exp-name", "run with spaces")


@dataclass
class NodeCommand:
    """One node's dry-run line, split into torchrun's options and the program's arguments."""

    rank: int
    nnodes_label: int
    host: str
    python: str
    launcher: dict[str, str]  # torchrun options, e.g. {"--node-rank": "0", "--nnodes": "4", ...}
    module: str
    program_args: list[str]


def run_script(script: Path, *args: str, dry_run: bool = True, path_prefix: Optional[Path] = None,
               **env: str) -> subprocess.CompletedProcess:
    clean = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "LANG": "C.UTF-8"}
    if path_prefix is not None:
        clean["PATH"] = f"{path_prefix}:{clean['PATH']}"
    if dry_run:
        clean["DRY_RUN"] = "1"
    clean.update(env)
    return subprocess.run(["bash", str(script), *args], env=clean, cwd=ROOT, capture_output=True, text=True,
                          timeout=30)


def parse_node_line(line: str) -> NodeCommand:
    match = NODE_LINE.match(line)
    assert match, f"not a node line: {line!r}"
    argv = shlex.split(match.group(4))
    assert argv[1:3] == ["-m", "torch.distributed.run"], argv
    program_at = argv.index("-m", 3)  # the second -m: the training module
    options = argv[3:program_at]
    assert len(options) % 2 == 0, f"torchrun options are not flag/value pairs: {options}"
    launcher = dict(zip(options[::2], options[1::2]))
    return NodeCommand(rank=int(match.group(1)), nnodes_label=int(match.group(2)), host=match.group(3),
                       python=argv[0], launcher=launcher, module=argv[program_at + 1],
                       program_args=argv[program_at + 2:])


def node_commands(result: subprocess.CompletedProcess) -> list[NodeCommand]:
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("[node ")]
    return [parse_node_line(line) for line in lines]


def config_tsp_size(config: Path) -> int:
    return int(yaml.safe_load(config.read_text())["tsp-size"])


@pytest.mark.parametrize("script,nodes", [(SINGLE, 1), (MULTI, 1), (MULTI, 4)],
                         ids=["single-1node", "multi-1node", "multi-4nodes"])
def test_dry_run_rendezvous_and_ranks(script: Path, nodes: int) -> None:
    gpus_per_node = 8
    hosts = [f"gpu{i:03d}" for i in range(7, 7 + nodes)]
    nodelist = f"gpu[{7:03d}-{6 + nodes:03d}]"
    result = run_script(script, str(CONFIG.relative_to(ROOT)), *EXTRA, SLURM_NNODES=str(nodes),
                        SLURM_JOB_NODELIST=nodelist, GPUS_PER_NODE=str(gpus_per_node), SLURM_JOB_ID="123456")
    commands = node_commands(result)
    assert [c.rank for c in commands] == list(range(nodes))
    assert [c.host for c in commands] == hosts
    tsp = config_tsp_size(CONFIG)
    for command in commands:
        assert command.nnodes_label == nodes
        assert command.launcher == {
            "--node-rank": str(command.rank),
            "--nnodes": str(nodes),
            "--nproc-per-node": str(gpus_per_node),
            "--master-addr": hosts[0],             # the first host of the allocation, on every node
            "--master-port": str(20000 + 123456 % 20000),  # job-derived: same everywhere, distinct per job
        }
        assert command.module == "megatron_tsp.pretrain_gpt"
        assert command.program_args == ["--config", str(CONFIG), *EXTRA]  # absolute config, flags verbatim
    world = nodes * gpus_per_node
    assert world % tsp == 0
    assert f"world size {world}, tsp-size {tsp} ({world // tsp} TSP group(s))" in result.stdout


def test_dry_run_without_any_slurm_variables_invents_one_node() -> None:
    commands = node_commands(run_script(SINGLE, str(CONFIG)))
    assert len(commands) == 1 and commands[0].launcher["--nproc-per-node"] == "8"
    assert commands[0].launcher["--master-addr"] == commands[0].host


def test_hosts_come_from_scontrol_when_present(tmp_path: Path) -> None:
    fake = tmp_path / "scontrol"
    fake.write_text('#!/usr/bin/env bash\n[[ "$1 $2" == "show hostnames" ]] || exit 3\n'
                    'printf "alpha-1\\nbeta-2\\n"\n')
    fake.chmod(0o755)
    commands = node_commands(run_script(MULTI, str(CONFIG), path_prefix=tmp_path, SLURM_NNODES="2",
                                        SLURM_JOB_NODELIST="opaque-list", GPUS_PER_NODE="8"))
    assert [c.host for c in commands] == ["alpha-1", "beta-2"]
    assert {c.launcher["--master-addr"] for c in commands} == {"alpha-1"}


def test_gpus_per_node_from_slurm_and_tsp_size_override() -> None:
    # --tsp-size on the command line wins over the config (as in expand_config): 4 divides 4 GPUs per node.
    commands = node_commands(run_script(MULTI, str(CONFIG), "--tsp-size", "4", SLURM_NNODES="2",
                                        SLURM_JOB_NODELIST="n1,n2", SLURM_GPUS_ON_NODE="4"))
    assert [c.launcher["--nproc-per-node"] for c in commands] == ["4", "4"]
    assert commands[0].program_args[-2:] == ["--tsp-size", "4"]


def test_container_variant() -> None:
    result = run_script(MULTI, str(CONFIG), SLURM_NNODES="2", SLURM_JOB_NODELIST="n1,n2",
                        CONTAINER_IMAGE="nvcr.io#nvidia/pytorch:25.04-py3", CONTAINER_MOUNTS="/data:/data")
    srun_line = next(line for line in result.stdout.splitlines() if line.startswith("# srun "))
    assert "--container-image nvcr.io#nvidia/pytorch:25.04-py3" in srun_line
    assert f"--container-mounts {ROOT}:{ROOT},/data:/data" in srun_line
    assert f"--container-workdir {ROOT}" in srun_line
    assert {c.python for c in node_commands(result)} == {"python"}  # the image's interpreter


BAD = [  # script, args, env, text stderr must contain
    (MULTI, [str(CONFIG)], {"SLURM_NNODES": "1", "GPUS_PER_NODE": "6"}, "tsp-size 8 does not divide 6 GPUs"),
    (MULTI, [str(CONFIG), "--tsp-size", "16"], {"SLURM_NNODES": "2"}, "tsp-size 16 does not divide 8 GPUs"),
    (SINGLE, [str(CONFIG)], {"SLURM_NNODES": "2"}, "use sbatch_multi_node.sh"),
    (MULTI, [str(CONFIG)], {"SLURM_NNODES": "3", "SLURM_JOB_NODELIST": "a,b"}, "has 2 host(s) but SLURM_NNODES"),
    (MULTI, ["configs/no_such.yaml"], {}, "config file 'configs/no_such.yaml' not found"),
    (MULTI, [], {}, "usage: sbatch"),
]


@pytest.mark.parametrize("script,args,env,message", BAD, ids=[case[3] for case in BAD])
def test_bad_launch_fails_before_anything_runs(script: Path, args: list[str], env: dict[str, str],
                                               message: str) -> None:
    result = run_script(script, *args, **env)
    assert result.returncode != 0
    assert message in result.stderr
    assert "[node " not in result.stdout


def test_real_launch_outside_slurm_refuses() -> None:
    result = run_script(MULTI, str(CONFIG), dry_run=False)
    assert result.returncode != 0 and "SLURM_JOB_NODELIST is not set" in result.stderr


def test_scripts_parse() -> None:
    for script in sorted(SLURM.glob("*.sh")):
        check = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert check.returncode == 0, f"{script.name}: {check.stderr}"
    if shutil.which("shellcheck"):
        check = subprocess.run(["shellcheck", "-x", *map(str, sorted(SLURM.glob("*.sh")))], capture_output=True,
                               text=True, cwd=SLURM)
        assert check.returncode == 0, check.stdout
