"""Policy step and reference pass in fp32, bf16 (DeepSpeed's bf16 mode, ray_dpo's
model.dtype: bf16) and torch autocast (DeepSpeed's torch_autocast section, fp32 weights),
side by side in one process on one model.

    .venv/bin/python benchmarks/precision.py .assets/smollm2-135m-instruct [fp32 ds_bf16 autocast]

Policy step: a DPO-shaped step of the sentiment example's size (16 sequences x 48 tokens,
8 pairs; full-vocabulary logits, fp32 log-prob sums, backward, torch AdamW) through a
ZeRO-1 DeepSpeed engine, world size 1 over gloo, 2 threads; 1 warm-up step, then 5 timed.
Reference pass: a plain Hugging Face model scoring 64 sequences x 48 tokens without
gradient, as a reference actor holds it (the autocast mode under torch.autocast).
Random token ids (seeded): the cost does not depend on which tokens they are.
Prints one JSON line per mode: s/step, reference s/pass, and the losses (fp32 moves
with lr 1e-6; bf16 weights hide such steps until the fp32 master weights cross a bf16
rounding boundary).
"""
import json
import os
import sys
import time

os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29534"), RANK="0",
                  WORLD_SIZE="1", LOCAL_RANK="0")
import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from ray_dpo.batching.logps import sequence_logps  # noqa: E402


def run(path, mode, ids, mask, ref_ids, steps=5):
    cfg = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1, "train_batch_size": 8,
           "gradient_clipping": 1.0, "zero_optimization": {"stage": 1}, "steps_per_print": 10**9}
    load = torch.float32
    if mode == "ds_bf16":  # what ray_dpo.policy.ds_config builds for model.dtype: bf16
        cfg["bf16"] = {"enabled": True}
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
        load = torch.bfloat16
    if mode == "autocast":
        cfg["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=load)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    eng, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg, dist_init_required=False)
    times, losses = [], []
    for s in range(steps + 1):
        t0 = time.perf_counter()
        logits = eng(input_ids=ids).logits
        lp, _ = sequence_logps(logits, ids, mask)
        loss = -lp.mean() / 40
        eng.backward(loss)
        eng.step()
        if s:
            times.append(time.perf_counter() - t0)
        losses.append(round(loss.item(), 4))
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=load).eval()
    rt = []
    with torch.no_grad():
        for s in range(3):
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
                lg = ref(input_ids=ref_ids).logits
            sequence_logps(lg, ref_ids, torch.ones_like(ref_ids, dtype=torch.bool))
            if s:
                rt.append(time.perf_counter() - t0)
    return {"mode": mode, "step_s": [round(t, 2) for t in times], "mean_step_s": round(sum(times) / len(times), 2),
            "ref64_s": round(sum(rt) / len(rt), 2), "losses": losses}


def main():
    torch.set_num_threads(2)
    dist.init_process_group("gloo", rank=0, world_size=1)
    deepspeed.init_distributed(dist_backend="gloo", dist_init_required=False)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49000, (16, 48), generator=g)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[:, :12] = False  # the prompt part is not scored
    ref_ids = torch.randint(0, 49000, (64, 48), generator=g)
    for mode in sys.argv[2:] or ("fp32", "ds_bf16", "autocast"):
        print(json.dumps(run(sys.argv[1], mode, ids, mask, ref_ids)), flush=True)


if __name__ == "__main__":
    main()
