"""The one torch.distributed world and the DeepSpeed engines of its role groups.

- `init_distributed()` joins the world under any launcher: the deepspeed launcher and
  torchrun (RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* in the environment), mpirun (OMPI_*)
  and srun (SLURM_*).
- `make_groups(plan)` creates every process group of the role plan on every rank, in
  one canonical order, as torch.distributed requires.
- `build_engine(...)` builds a DeepSpeed engine whose data-parallel group is one role
  group (through DeepSpeed's `mpu` hook), so ZeRO partitions inside that group only;
  `release_engine(...)` frees it so the rank can build the next one (time-shared
  teachers, then the student).
- `group_scope(group)` makes DeepSpeed treat the group as its world (it assumes in a
  few places that the engine spans the world); build_engine enters it for the engine's
  life.

DeepSpeed is imported inside the functions that use it: it picks its accelerator when
first imported, which must come after `init_distributed` has chosen (DS_ACCELERATOR).
"""
from __future__ import annotations

import copy
import functools
import gc
import importlib
import json
import math
import os
import re
import socket
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from dist_xqa.plan import RoleGroup, RolePlan

DEFAULT_MASTER_PORT = 29500


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the world."""

    rank: int
    world_size: int
    local_rank: int
    backend: str  # "nccl" on CUDA, else "gloo"
    device: torch.device


# torchrun and the deepspeed launcher mark every process they start: a RANK beside one of
# these marks was set by the launcher that started this process, not inherited.
LAUNCHER_MARKS = ("TORCHELASTIC_RUN_ID", "CROSS_RANK")


def launcher_env(env: dict[str, str]) -> dict[str, str]:
    """RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT for this process, from
    what the launcher that started it set in `env`, looked for in this order:

    1. torchrun or the deepspeed launcher (LAUNCHER_MARKS): their RANK, WORLD_SIZE,
       LOCAL_RANK and MASTER_*, also inside a Slurm step (srun starting one per node).
    2. mpirun: OMPI_COMM_WORLD_*, before Slurm's variables because an mpirun inside an
       sbatch job also inherits the batch script's SLURM_PROCID.
    3. srun (a task of a job step: SLURM_PROCID with SLURM_STEP_ID): SLURM_PROCID, the
       step's task count and SLURM_LOCALID; the rendezvous on the step's first node at a
       port derived from the job id. RANK, WORLD_SIZE, LOCAL_RANK and MASTER_* in the
       environment are ignored: sbatch and srun pass the submitting shell's environment
       on, where they may be left from another run, and ranks taken from them would
       collide or meet on a host outside the allocation.
    4. RANK and WORLD_SIZE set by anything else (by hand, another launcher): as set.
    5. A Slurm batch script itself (SLURM_PROCID without a step): a world of one when the
       job has one task; with more, a ValueError (srun starts the tasks).
    6. No launcher at all: a world of one."""
    given = "RANK" in env and "WORLD_SIZE" in env
    if given and any(mark in env for mark in LAUNCHER_MARKS):
        return _given_world(env)
    if "OMPI_COMM_WORLD_RANK" in env:
        rank, world_size = _int(env, "OMPI_COMM_WORLD_RANK"), _int(env, "OMPI_COMM_WORLD_SIZE")
        local_rank = _int(env, "OMPI_COMM_WORLD_LOCAL_RANK") if "OMPI_COMM_WORLD_LOCAL_RANK" in env else rank
        one_node = env.get("OMPI_COMM_WORLD_LOCAL_SIZE") == str(world_size)
        return _world(env, rank, world_size, local_rank, one_node, env.get("MASTER_ADDR"), env.get("MASTER_PORT"))
    if "SLURM_PROCID" in env and ("SLURM_STEP_ID" in env or "SLURM_STEPID" in env):
        rank, local_rank = _int(env, "SLURM_PROCID"), _int(env, "SLURM_LOCALID")
        world_size = _int(env, _first_set(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS"))
        nodelist = env.get(_first_set(env, "SLURM_STEP_NODELIST", "SLURM_NODELIST", "SLURM_JOB_NODELIST"), "")
        if not nodelist and env.get(_first_set(env, "SLURM_STEP_NUM_NODES", "SLURM_NNODES"), "1") != "1":
            raise ValueError("srun gave no node list (SLURM_STEP_NODELIST, SLURM_NODELIST, SLURM_JOB_NODELIST): "
                             "cannot tell where rank 0 runs")
        master_addr = first_slurm_host(nodelist) if nodelist else "127.0.0.1"
        return _world(env, rank, world_size, local_rank, True, master_addr, None)
    if given:
        return _given_world(env)
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and _int(env, "SLURM_NTASKS") > 1:
        raise ValueError(f"this process is the batch script of Slurm job {env.get('SLURM_JOB_ID', '?')} "
                         f"(SLURM_PROCID without SLURM_STEP_ID), not one of its {env['SLURM_NTASKS']} tasks: "
                         "start the ranks with srun, as slurm/train_lbmrc.sh does")
    return _world(env, 0, 1, 0, True, None, None)


def _given_world(env: dict[str, str]) -> dict[str, str]:
    rank, world_size = _int(env, "RANK"), _int(env, "WORLD_SIZE")
    local_rank = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
    return _world(env, rank, world_size, local_rank, False, env.get("MASTER_ADDR"), env.get("MASTER_PORT"))


def _world(env: dict[str, str], rank: int, world_size: int, local_rank: int, one_node: bool,
           master_addr: str | None, master_port: str | None) -> dict[str, str]:
    """The launcher's answer, checked, with the rendezvous filled in where it gave none:
    this host for a world of one, else the job's first node under Slurm, else this host
    when every rank is on it."""
    if not 0 <= rank < world_size:
        raise ValueError(f"launcher environment gives rank {rank} outside a world of {world_size}")
    if local_rank < 0:
        raise ValueError(f"launcher environment gives a negative local rank {local_rank}")
    if master_addr is None:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if world_size == 1:
            master_addr = "127.0.0.1"
        elif nodelist:
            master_addr = first_slurm_host(nodelist)
        elif one_node:
            master_addr = "127.0.0.1"
        else:
            raise ValueError(f"cannot tell where rank 0 runs for a world of {world_size} ranks: "
                             "set MASTER_ADDR (and MASTER_PORT) in the environment")
    if master_port is None:
        if "SLURM_JOB_ID" in env:
            # one port per job, so two jobs sharing a node do not meet at the same port
            master_port = str(20000 + _int(env, "SLURM_JOB_ID") % 20000)
        elif world_size == 1:
            master_port = str(_free_port())
        else:
            master_port = str(DEFAULT_MASTER_PORT)
    return {"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(local_rank),
            "MASTER_ADDR": master_addr, "MASTER_PORT": master_port}


def _first_set(env: dict[str, str], *names: str) -> str:
    """The first of `names` set in `env` (the last name when none is: errors then name it)."""
    return next((name for name in names if env.get(name)), names[-1])


def _int(env: dict[str, str], name: str) -> int:
    if name not in env:
        raise ValueError(f"launcher environment: {name} is not set")
    try:
        return int(env[name])
    except ValueError:
        raise ValueError(f"launcher environment: {name} must be an integer, got {env[name]!r}") from None


def cuda_device_index(local_rank: int, device_count: int) -> int:
    """The CUDA device of a rank: its local rank modulo the devices it sees. Where Slurm
    binds one GPU to each task (--gpus-per-task, --gpu-bind), every task sees only
    device 0, whatever its local rank."""
    if device_count < 1:
        raise ValueError(f"no CUDA device to pin local rank {local_rank} to")
    return local_rank % device_count


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list such as "gpu[003-008,012],cpu1" (-> "gpu003")."""
    depth, end = 0, len(nodelist)
    for i, char in enumerate(nodelist):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            end = i
            break
    first = nodelist[:end].strip()
    host = re.sub(r"\[([^\]]*)\]", lambda m: m.group(1).split(",")[0].split("-")[0], first)
    if not host or "[" in host or "]" in host:
        raise ValueError(f"cannot read the first host of SLURM node list {nodelist!r}")
    return host


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Variables through which launchers tell a rank how many ranks share its node: torchrun,
# the deepspeed launcher, mpirun, srun (srun's may read "2(x3)": 2 tasks on each of 3 nodes).
LOCAL_SIZE_VARIABLES = ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE")


def rank_threads(env: dict[str, str], cores: int) -> int | None:
    """Intra-op threads for one rank: the cores this process may run on shared among the
    ranks of its node, or None where OMP_NUM_THREADS says (the user's choice is kept).
    Under srun with --cpus-per-task, Slurm has already narrowed this process's cores to its
    own (SLURM_CPUS_PER_TASK), so they are not divided again. torch's default, every core
    in every rank, oversubscribes the node: two ranks of two threads each on two cores
    trained the demo's model 6x slower than one thread each (spinning OpenMP threads
    waiting for cores the other rank holds)."""
    if env.get("OMP_NUM_THREADS"):
        return None
    if env.get("SLURM_CPUS_PER_TASK") and env.get("SLURM_PROCID"):
        return max(1, min(cores, int(env["SLURM_CPUS_PER_TASK"])))
    local_ranks = next((int(env[name].split("(")[0]) for name in LOCAL_SIZE_VARIABLES if env.get(name)), 1)
    return max(1, cores // max(1, local_ranks))


def init_distributed(timeout: timedelta = timedelta(minutes=30)) -> DistContext:
    """Join the world (see `launcher_env`), backend nccl on CUDA else gloo, pin this
    process to its GPU (`cuda_device_index`), and start DeepSpeed's communication layer on every rank now:
    on CPU it builds (first time: compiles) a shared-memory op and, under the deepspeed
    launcher, waits until every rank of the node has created its segment. Left to the
    first `build_engine`, that wait would hang a group while a producer rank (which
    never builds an engine) is busy elsewhere. Without CUDA, DeepSpeed is told to use
    its CPU accelerator. Each rank runs `rank_threads` intra-op threads unless
    OMP_NUM_THREADS is set. A second call returns the context of the first. `timeout` bounds
    every collective of the world, the start-up ones included, while rank 0 prepares the
    data (train.py passes run.stall_timeout_s)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if not dist.is_initialized():
        os.environ.update(launcher_env(dict(os.environ)))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    threads = rank_threads(dict(os.environ), len(os.sched_getaffinity(0)))
    if threads is not None:
        torch.set_num_threads(threads)
    if torch.cuda.is_available():
        backend, device = "nccl", torch.device("cuda", cuda_device_index(local_rank, torch.cuda.device_count()))
        torch.cuda.set_device(device)
    else:
        backend, device = "gloo", torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method="env://", timeout=timeout,
                                rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    import deepspeed.comm

    deepspeed.comm.init_distributed(dist_backend=backend, timeout=timeout, verbose=False)
    if not torch.cuda.is_available():
        dist.barrier()  # every rank has mapped every rank's segment: the names can go
        _unlink_shm_segment(dist.get_rank())
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                       backend=dist.get_backend(), device=device)


def _unlink_shm_segment(rank: int) -> None:
    """Remove this rank's name of DeepSpeed's CPU shared-memory all-reduce segment.
    DeepSpeed never unlinks it, so every run (finished or killed) left ~69 MB of RAM per
    rank in /dev/shm; hundreds of test and benchmark runs filled half the memory of a
    24 GiB machine. The ranks keep their mappings, so the memory is freed when the last
    one exits, however it exits. The name is DeepSpeed's (csrc/cpu/comm/shm.cpp)."""
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}"
            f"_{os.environ.get('MASTER_PORT', '')}_{rank}")
    Path("/dev/shm", name).unlink(missing_ok=True)


@dataclass(frozen=True)
class TrainingGroup:
    """A role group of the plan made real on a rank that belongs to it."""

    role_group: RoleGroup
    process_group: dist.ProcessGroup  # the role group: DeepSpeed's data-parallel group
    self_group: dist.ProcessGroup  # this rank alone: DeepSpeed's (trivial) model-parallel group

    @property
    def name(self) -> str:
        return self.role_group.name

    @property
    def ranks(self) -> tuple[int, ...]:
        return self.role_group.ranks

    @property
    def size(self) -> int:
        return self.role_group.size

    @property
    def rank(self) -> int:
        """This rank's index inside the group."""
        return dist.get_rank(self.process_group)


def make_groups(plan: RolePlan, timeout: timedelta | None = None) -> dict[str, TrainingGroup]:
    """Create every process group the plan needs, on every rank, in the canonical order:
    first one single-rank group per rank (0..N-1, the trivial model-parallel groups),
    then `plan.all_groups()`. Returns the groups this rank belongs to, by name.
    No other process group may be created between `init_distributed` and this call on
    some ranks only, or the ranks' group numbering would differ."""
    if not dist.is_initialized():
        raise RuntimeError("make_groups needs init_distributed() first")
    if dist.get_world_size() != plan.world_size:
        raise ValueError(f"the role plan is for {plan.world_size} rank(s) but the world has {dist.get_world_size()}")
    me = dist.get_rank()
    self_group = None
    for rank in range(plan.world_size):
        group = dist.new_group([rank], timeout=timeout)
        if rank == me:
            self_group = group
    mine: dict[str, TrainingGroup] = {}
    for role_group in plan.all_groups():
        process_group = dist.new_group(list(role_group.ranks), timeout=timeout)
        if me in role_group.ranks:
            mine[role_group.name] = TrainingGroup(role_group, process_group, self_group)
    return mine


class GroupMPU:
    """The `mpu` object DeepSpeed 0.19 accepts: data parallelism over one role group,
    no tensor or pipeline parallelism (their groups are this rank alone).

    DeepSpeed calls the data- and model-parallel getters (engine, ZeRO 1-3, gradient
    clipping, batch-size arithmetic in DeepSpeedConfig), the tensor- and
    pipeline-parallel getters when present (deepspeed.utils.bwc, checkpoint metadata)
    and `get_data_parallel_group_ranks` (deepspeed.utils.groups). It must not define
    `initialize_sequence_parallel`: DeepSpeed takes that as a sequence-parallel mpu."""

    def __init__(self, group: TrainingGroup):
        self.group = group

    def get_data_parallel_group(self) -> dist.ProcessGroup:
        return self.group.process_group

    def get_data_parallel_rank(self) -> int:
        return dist.get_rank(self.group.process_group)

    def get_data_parallel_world_size(self) -> int:
        return self.group.size

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(self.group.ranks)

    def get_model_parallel_group(self) -> dist.ProcessGroup:
        return self.group.self_group

    def get_model_parallel_rank(self) -> int:
        return 0

    def get_model_parallel_world_size(self) -> int:
        return 1

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_pipeline_model_parallel_group = get_model_parallel_group
    get_pipeline_model_parallel_rank = get_model_parallel_rank
    get_pipeline_model_parallel_world_size = get_model_parallel_world_size

    def get_tensor_model_parallel_src_rank(self) -> int:
        return dist.get_rank()


# DeepSpeed 0.19 assumes that its engine spans the whole world in a few places:
# - deepspeed.comm.barrier / all_reduce without a group: three barriers in ZeRO-3 set-up,
#   two barriers and the checkpoint-tag check's two all_reduces in save_checkpoint. The
#   value is the position of `group` among the function's parameters (their timing
#   wrapper hides the signature from inspect).
_WORLD_COLLECTIVES = {"barrier": 0, "all_reduce": 2}
# - ZeRO-3's check that all ranks traced the same module order (every forward until the
#   trace is complete, again after any change of path such as train -> eval) broadcasts
#   from world rank 0 over the world. These modules hold their own reference to it.
_RANK0_CHECK = "assert_ints_same_as_other_ranks"
_RANK0_CHECK_USERS = ("deepspeed.runtime.zero.partitioned_param_coordinator", "deepspeed.runtime.zero.stage3",
                      "deepspeed.runtime.zero.partition_parameters")


@contextmanager
def group_scope(group: TrainingGroup) -> Iterator[None]:
    """Inside this block DeepSpeed treats `group` as its world: its collectives that name
    no group run on `group`, and ZeRO-3's trace check compares with the group's first
    rank instead of world rank 0. A world-wide collective would hang the group whenever
    other ranks are busy elsewhere (a producer rank never builds an engine; one teacher
    group saves a checkpoint while another trains) or pair up with an unrelated
    collective of another group. `build_engine` enters it for the engine's whole life
    and `release_engine` leaves it; only deepspeed.comm is affected, torch.distributed
    calls still mean the world."""
    import deepspeed.comm as ds_comm

    def scoped(function, group_position: int):
        @functools.wraps(function)
        def call(*args, **kwargs):
            if len(args) > group_position:
                if args[group_position] is None:
                    args = args[:group_position] + (group.process_group,) + args[group_position + 1:]
            elif kwargs.get("group") is None:
                kwargs["group"] = group.process_group
            return function(*args, **kwargs)

        return call

    def same_in_group(ints: list[int]) -> None:
        first = [list(ints)]
        dist.broadcast_object_list(first, src=group.ranks[0], group=group.process_group)
        if first[0] != list(ints):
            raise RuntimeError(f"group {group.name}: rank {dist.get_rank()} disagrees with rank {group.ranks[0]} "
                               f"on the ZeRO-3 trace: {ints} vs {first[0]}")

    patches = [(ds_comm, name, scoped(getattr(ds_comm, name), position))
               for name, position in _WORLD_COLLECTIVES.items()]
    patches += [(importlib.import_module(module), _RANK0_CHECK, same_in_group) for module in _RANK0_CHECK_USERS]
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    try:
        for owner, name, replacement in patches:
            setattr(owner, name, replacement)
        yield
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)


def load_ds_config(source: dict[str, Any] | str | Path) -> dict[str, Any]:
    """A DeepSpeed config from a JSON file (or a dict, copied), refused with the file, line
    and column when it does not parse."""
    if isinstance(source, dict):
        return copy.deepcopy(source)
    path = Path(source)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ValueError(f"DeepSpeed config {path}: cannot read it ({err.strerror})") from err
    try:
        config = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"DeepSpeed config {path}, line {err.lineno} column {err.colno}: {err.msg}") from err
    if not isinstance(config, dict):
        raise ValueError(f"DeepSpeed config {path}: the top level must be a JSON object")
    return config


def resolve_ds_config(config: dict[str, Any], group_size: int, *, on_cuda: bool, bf16_supported: bool,
                      lr: float, weight_decay: float, micro_batch_size: int | None = None,
                      gradient_accumulation_steps: int | None = None, total_steps: int | None = None,
                      warmup_ratio: float = 0.0, source: str = "DeepSpeed config") -> dict[str, Any]:
    """The config DeepSpeed gets for one group (a new dict; pure, so it is unit-tested):
    - batch: train_batch_size = micro batch x accumulation x group size, the micro batch
      and accumulation from the arguments where given, else from the config;
    - optimizer lr and weight decay from the arguments (the run config owns them);
    - with `total_steps`, the learning-rate schedule: DeepSpeed's WarmupDecayLR, linear
      warmup from 0 over `warmup_ratio` of the optimizer steps, then linear decay to 0 at
      `total_steps` (a "scheduler" in the JSON is replaced: the run config owns it too);
    - precision: bf16/fp16 `enabled` may be true, false or "auto". On CUDA "auto" means
      bf16 where the GPU supports it, else fp16; without CUDA both are switched off;
    - Adam and AdamW are torch's ("torch_adam": true), so no job compiles an op at its
      first step: DeepSpeed's own FusedAdam (GPU) and CPUAdam (ZeRO-Offload) are built
      then, FusedAdam only with an nvcc matching torch's CUDA, by every rank of a node at
      once. On CUDA a config that says "torch_adam": false gets DeepSpeed's ops (the
      opt-in: faster optimizer steps, CPUAdam above all, for that build); without CUDA
      torch's AdamW always (ZeRO-Offload runs with it too).
    `source` names the config in errors."""
    config = copy.deepcopy(config)
    micro = micro_batch_size if micro_batch_size is not None else config.get("train_micro_batch_size_per_gpu")
    accumulation = gradient_accumulation_steps if gradient_accumulation_steps is not None \
        else config.get("gradient_accumulation_steps", 1)
    for key, value in (("train_micro_batch_size_per_gpu", micro), ("gradient_accumulation_steps", accumulation)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{source}: {key} must be an integer >= 1, got {value!r}")
    config["train_micro_batch_size_per_gpu"] = micro
    config["gradient_accumulation_steps"] = accumulation
    config["train_batch_size"] = micro * accumulation * group_size

    optimizer = config.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = optimizer.setdefault("params", {})
    params["lr"] = lr
    params["weight_decay"] = weight_decay
    if total_steps is not None:
        # DeepSpeed's scheduler is at iteration k - 1 after k optimizer steps (and at 0
        # before the first): `total_num_steps` = total_steps - 1 puts the lr at 0 once the
        # last step is taken. The lr is the configured one after warmup + 1 steps.
        config["scheduler"] = {"type": "WarmupDecayLR", "params": {
            "total_num_steps": max(1, total_steps - 1), "warmup_min_lr": 0.0, "warmup_max_lr": lr,
            "warmup_num_steps": math.ceil(warmup_ratio * total_steps), "warmup_type": "linear"}}

    bf16 = config.setdefault("bf16", {}).get("enabled", False)
    fp16 = config.setdefault("fp16", {}).get("enabled", False)
    for key, value in (("bf16.enabled", bf16), ("fp16.enabled", fp16)):
        if value not in (True, False, "auto"):
            raise ValueError(f"{source}: {key} must be true, false or \"auto\", got {value!r}")
    if not on_cuda:
        bf16 = fp16 = False
    elif bf16 is True or fp16 is True:
        bf16, fp16 = bf16 is True, fp16 is True
    elif "auto" in (bf16, fp16):
        bf16 = bf16_supported if bf16 == "auto" else False
        fp16 = not bf16 if fp16 == "auto" else False
    if bf16 and fp16:
        raise ValueError(f"{source}: bf16 and fp16 are both enabled; enable one")
    config["bf16"]["enabled"], config["fp16"]["enabled"] = bool(bf16), bool(fp16)

    if str(optimizer.get("type", "")).lower() in ("adam", "adamw"):
        if on_cuda:
            params.setdefault("torch_adam", True)
        else:
            params["torch_adam"] = True

    leftover = _auto_keys(config)
    if leftover:
        raise ValueError(f"{source}: \"auto\" is only understood for bf16.enabled and fp16.enabled, "
                         f"found it at {', '.join(leftover)}")
    return config


def _auto_keys(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [key for k, v in node.items() for key in _auto_keys(v, f"{prefix}{k}.")]
    return [prefix.rstrip(".")] if node == "auto" else []


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: weight decay on matrices and embeddings, none on biases and
    normalisation weights (the 1-d parameters), as Hugging Face's trainers do."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}]


@dataclass
class _HeldEngine:
    group_name: str
    scope: ExitStack  # the group_scope, left by release_engine


# DeepSpeed keeps its `mpu` in module state, so a rank can hold one training engine at a
# time; this is that engine's group and scope.
_held: _HeldEngine | None = None


def build_engine(model: torch.nn.Module, ds_config: dict[str, Any] | str | Path, group: TrainingGroup, *,
                 lr: float, weight_decay: float, micro_batch_size: int | None = None,
                 gradient_accumulation_steps: int | None = None, total_steps: int | None = None,
                 warmup_ratio: float = 0.0, lr_scheduler: Callable[[torch.optim.Optimizer], Any] | None = None):
    """A DeepSpeed engine training `model` with data parallelism (and ZeRO partitioning)
    over `group` only, its config resolved by `resolve_ds_config` for the group's size
    and this machine. Every rank of the group calls this together. The rank holds it
    until `release_engine`, and may not build another before."""
    global _held
    if _held is not None:
        raise RuntimeError(f"this rank still holds the training engine of group {_held.group_name!r}; "
                           f"release_engine() it before building one for {group.name!r}")
    import deepspeed

    source = str(ds_config) if isinstance(ds_config, (str, Path)) else "DeepSpeed config"
    config = resolve_ds_config(load_ds_config(ds_config), group.size, on_cuda=torch.cuda.is_available(),
                               bf16_supported=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
                               lr=lr, weight_decay=weight_decay, micro_batch_size=micro_batch_size,
                               gradient_accumulation_steps=gradient_accumulation_steps, total_steps=total_steps,
                               warmup_ratio=warmup_ratio, source=source)
    with ExitStack() as scope:
        scope.enter_context(group_scope(group))
        engine, *_ = deepspeed.initialize(model=model, config=config, mpu=GroupMPU(group),
                                          model_parameters=param_groups(model, weight_decay),
                                          lr_scheduler=lr_scheduler)
        # save_checkpoint lets only "global rank 0" create the directory and write the
        # `latest` tag that load_checkpoint and resuming look for: the group's first rank
        engine.global_rank = group.rank
        _held = _HeldEngine(group.name, scope.pop_all())
    return engine


def release_engine(engine) -> None:
    """Free `engine` (optimizer state, ZeRO hooks and buffers), forget its `mpu` in
    DeepSpeed's module state and leave its group scope, so this rank can build its next
    engine. Save what you need first: under ZeRO-3 the module's parameters stay
    partitioned. Drop your own references to the engine afterwards so its memory can go."""
    global _held
    from deepspeed.utils import groups

    try:
        engine.destroy()
    finally:
        groups.mpu = None
        if _held is not None:
            _held.scope.close()
            _held = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
