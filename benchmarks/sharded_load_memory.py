"""Peak memory (RSS) per rank of loading a model into FSDP2 shards and saving it back, two gloo ranks on CPU:
``whole`` (every rank ``from_pretrained`` then ``fully_shard``; the final model gathered whole to rank 0 and saved
there: the path before `hf_shards`) against ``sharded`` (`hf_shards.load_sharded` / `save_sharded`).

    python benchmarks/sharded_load_memory.py        # writes benchmarks/results/sharded_load_memory.csv

Each mode runs in fresh processes; a rank reports its RSS after joining the group (the baseline: torch and
transformers imported) and its peak RSS (VmHWM, restarted at the baseline) after loading and after saving, as growth
over the baseline. Memory-mapped pages of the safetensors files a rank touched count while they are mapped.
"""
import csv
import datetime
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

SHAPE = {"vocab_size": 32000, "hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 8,
         "num_attention_heads": 8}
WORLD = 2


def _status_mib(field) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def rss_mib() -> float:
    return _status_mib("VmRSS")


def reset_peak():
    """Restart the peak at the current RSS (a child process inherits its parent's ``ru_maxrss``, so that is not
    used)."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_mib() -> float:
    return _status_mib("VmHWM")


def rank_main(mode, model_dir, out_dir):
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from geffect_kernels.train.hf_shards import load_sharded, save_sharded
    from geffect_kernels.train.sharding import shard

    dist.init_process_group("gloo")
    cpu, rank = torch.device("cpu"), dist.get_rank()
    reset_peak()
    base = rss_mib()
    if mode == "whole":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        model = shard(AutoModelForCausalLM.from_pretrained(model_dir), cpu)
        loaded = peak_mib()
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            model.save_pretrained(out_dir, state_dict=state)
        del state
    else:
        model = load_sharded(model_dir, cpu)
        loaded = peak_mib()
        save_sharded(model, out_dir)
    saved = peak_mib()
    print(json.dumps({"rank": rank, "base_mib": base, "load_mib": loaded - base, "load_and_save_mib": saved - base}))
    dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_mode(mode, model_dir, out_dir) -> list[dict]:
    port = free_port()
    procs = []
    for rank in range(WORLD):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "TRANSFORMERS_VERBOSITY": "error"}
        procs.append(subprocess.Popen([sys.executable, __file__, "--rank", mode, str(model_dir), str(out_dir)],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    rows = []
    for rank, proc in enumerate(procs):
        out, err = proc.communicate(timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"{mode}: rank {rank} exited {proc.returncode}:\n{err[-3000:]}")
        rows.append(json.loads(out.strip().splitlines()[-1]))
    return rows


def main():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from provenance import stamp

    with tempfile.TemporaryDirectory() as tmp:
        model = LlamaForCausalLM(LlamaConfig(**SHAPE, tie_word_embeddings=False))
        params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(Path(tmp) / "model")
        del model
        model_mib = params * 4 / 2**20
        rows = []
        for mode in ("whole", "sharded"):
            for r in run_mode(mode, Path(tmp) / "model", Path(tmp) / f"out-{mode}"):
                rows.append({"mode": mode, "rank": r["rank"], "world": WORLD, "params": params,
                             "model_mib": round(model_mib, 1), "base_rss_mib": round(r["base_mib"], 1),
                             "peak_load_mib": round(r["load_mib"], 1),
                             "peak_load_and_save_mib": round(r["load_and_save_mib"], 1),
                             "shape": json.dumps(SHAPE), **stamp(),
                             "utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")})
                print(f"{mode:8s} rank {r['rank']}: +{r['load_mib']:.0f} MiB at load, +{r['load_and_save_mib']:.0f} "
                      f"MiB at load+save (model {model_mib:.0f} MiB in float32; torch {torch.__version__})")
    path = HERE / "results" / "sharded_load_memory.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--rank"]:
        rank_main(*sys.argv[2:5])
    else:
        main()
