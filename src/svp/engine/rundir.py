"""The run folder: creating it, its config, adapters (best/, last/), the resume point,
the non-finite dump and the final files. Only the main rank writes."""
from __future__ import annotations

import os
import time
from typing import Any, Dict

import torch

from . import checkpoint as ck
from . import config as C
from ..errors import ConfigError, ResumeError
from .distributed import DistInfo, broadcast_object, unwrap


def default_run_name(cfg: dict) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return f"{cfg['data']['dataset']}-{cfg['method']['name']}-s{cfg['train']['seed']}-{stamp}"


def prepare_run_dir(cfg: dict, dist_info: DistInfo) -> str:
    run_dir = None
    if dist_info.is_main:
        name = cfg["run"]["name"] or default_run_name(cfg)
        run_dir = os.path.abspath(os.path.join(cfg["run"]["output"], name))
        if os.path.exists(os.path.join(run_dir, ck.RESUME_FILE)) or os.path.exists(
                os.path.join(run_dir, "results.json")):
            raise ConfigError(f"run folder {run_dir} already holds a run; use `svp train --resume {run_dir}` "
                              f"or choose another run.name")
        os.makedirs(run_dir, exist_ok=True)
    return broadcast_object(run_dir, dist_info)


def load_run_config(run_dir: str, overrides=()) -> dict:
    """The saved ``config.yaml`` of a run with ``debug.*`` reset and ``overrides`` applied."""
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        raise ResumeError(f"{run_dir} is not a run folder (no config.yaml)")
    saved = C.load_yaml(path)
    if isinstance(saved, dict):
        saved.pop("debug", None)  # fault injections never carry over to a resumed run
    return C.resolve(overrides=overrides, base=saved, use_presets=False)


def check_resumable(run_dir: str) -> None:
    if not os.path.isfile(os.path.join(run_dir, ck.RESUME_FILE)):
        raise ResumeError(f"{run_dir}: nothing to resume (no {ck.RESUME_FILE}; "
                          f"the run finished or never saved a resume point)")


def load_trainable(model, state: Dict[str, torch.Tensor], what: str) -> None:
    try:
        unwrap(model).load_adapter_state(state, what)
    except ValueError as e:
        raise ResumeError(f"{e}\nwas the method or model changed since the run started?") from None


class RunFolder:
    def __init__(self, run_dir: str, cfg: dict, dist_info: DistInfo):
        self.path, self.cfg, self.dist = run_dir, cfg, dist_info

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def start(self, fresh: bool) -> None:
        if self.dist.is_main:
            ck.atomic_write_text(self.file("config.yaml"), C.dump(self.cfg))
            if fresh:  # a fresh run never appends to stale metric lines
                ck.rewrite_jsonl(self.file("metrics.jsonl"), [])

    def append_metrics(self, record: dict) -> None:
        ck.append_jsonl(self.file("metrics.jsonl"), record)

    def rewrite_metrics(self, history) -> None:
        ck.rewrite_jsonl(self.file("metrics.jsonl"), history)

    def save_adapter(self, model, name: str, spec, epoch: int) -> None:
        base = unwrap(model)
        record = dict(spec.to_dict(), epoch=epoch)

        def write(d):
            base.save(d, base_model_name=self.cfg["model"]["name"], class_names=spec.class_names)
            ck.atomic_write_json(os.path.join(d, "backbone.json"), record)

        ck.atomic_replace_dir(write, self.file(name))

    def save_resume(self, st: dict, model, optimizer, sched, scaler, ema) -> None:
        state: Dict[str, Any] = dict(st)
        state["model"] = unwrap(model).adapter_state_dict()
        state["optimizer"] = optimizer.state_dict()
        state["scheduler"] = sched.state_dict()
        state["scaler"] = scaler.state_dict()
        state["ema"] = ({n: p.detach().cpu().clone() for n, p in ema.module.named_parameters()
                         if n in state["model"]} if ema is not None else None)
        state["rng"] = ck.rng_state()
        state["world_size"] = self.dist.world_size
        state["batch_size"] = int(self.cfg["train"]["batch_size"])
        state["time"] = time.time()
        ck.save_state(self.file(ck.RESUME_FILE), state)

    def load_resume(self, st: dict, model, optimizer, sched, scaler, ema) -> dict:
        state = ck.load_state(self.file(ck.RESUME_FILE))
        bs = int(self.cfg["train"]["batch_size"])
        if state["world_size"] != self.dist.world_size or state["batch_size"] != bs:
            raise ResumeError(
                f"{self.path}: the run used world size {state['world_size']} x batch {state['batch_size']}; "
                f"resume it with the same (now {self.dist.world_size} x {bs})")
        load_trainable(model, state["model"], self.file(ck.RESUME_FILE))
        optimizer.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None and state.get("ema") is not None:
            params = dict(ema.module.named_parameters())
            with torch.no_grad():
                for n, v in state["ema"].items():
                    params[n].copy_(v.to(params[n].device))
        ck.set_rng_state(state["rng"])
        return {k: state.get(k, v) for k, v in st.items()}

    def dump_nonfinite(self, info: dict, x, y, model) -> str:
        out_dir = self.file("nonfinite")
        os.makedirs(out_dir, exist_ok=True)
        ck.atomic_write_json(os.path.join(out_dir, "nonfinite.json"), info)
        tensors = {"inputs": x.detach().cpu().float().contiguous(), "targets": y.detach().cpu().contiguous()}
        tensors.update({f"param/{k}": v for k, v in unwrap(model).adapter_state_dict().items()})
        ck.atomic_save_tensors(os.path.join(out_dir, "batch_and_weights.safetensors"), tensors,
                               {"what": "inputs/targets of the failing step and the weights before it"})
        return out_dir

    def finish(self, res: dict) -> None:
        res["adapter_bytes"] = ck.dir_size(self.file("last"))
        res["run_dir"] = self.path
        ck.atomic_write_json(self.file("results.json"), res)
        # the run is complete: the resume point is no longer needed
        if os.path.exists(self.file(ck.RESUME_FILE)):
            os.replace(self.file(ck.RESUME_FILE), self.file("final_state.safetensors"))
